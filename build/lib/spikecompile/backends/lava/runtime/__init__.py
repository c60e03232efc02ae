"""The runtime of a spikecompile Lava program (numpy + lava only), copied verbatim into every emitted program as
its lava_program package: compat (the Python 3.11 import fix), processes (the phase neuron and the non-spiking
ops), program (build and run network.json under Loihi2SimCfg)."""
