"""The signed-digit neuron (--coding phase-sd) in the IR and the simulator: a model converted with phase-sd builds,
its decoded run is the interpreter (the neuron module's phase_quantize at every site), event mode equals decoded
mode node by node with the same signed spike planes, every nonzero digit (a −1 too) is one spike and each of its
fan-outs one AC, and late-spike masking treats a −1 as a spike. The NIR, ONNX and Lava lowerings of the same
model are checked in tests/test_nir.py, test_onnx.py and test_lava.py (fixtures `sd_built` there use
signed_built below)."""

import pytest
import torch
from conftest import assert_masking_fewer_spikes_same_in_both_modes, convert_tiny

from spikecompile.backends.sim import simulate
from spikecompile.backends.sim.simulate import run
from spikecompile.neuron import mask_late_spikes
from spikecompile.build import BuildOptions, build
from spikecompile.ir import Output, PhaseNeuron, interpret, retyped
from spikecompile.neuron import phase_encode, phase_quantize


def signed_built(root):
    """The tiny model converted with --coding phase-sd (T=6, 2 grains, rotation, prefix) and built."""
    return build(convert_tiny(root, "sd", "--coding", "phase-sd"), BuildOptions())


def _ids(length=20, seed=0):
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return signed_built(tmp_path_factory.mktemp("sd-sim"))


@pytest.fixture(scope="module")
def float64_traces(built):
    graph, store = retyped(built.graph, built.store, torch.float64)
    return graph, store, run(graph, store, _ids(), "decoded"), run(graph, store, _ids(), "event")


def test_every_site_of_a_phase_sd_model_is_a_signed_digit_node(built):
    neurons = [built.graph[name] for name in built.graph if isinstance(built.graph[name], PhaseNeuron)]
    assert neurons and all(node.signed_digits and node.params().signed_digits for node in neurons)


def test_decoded_mode_is_the_interpreter_and_each_site_the_neuron_module(built):
    ids = _ids()
    recording = run(built.graph, built.store, ids, "decoded")
    (output,) = [name for name in built.graph if isinstance(built.graph[name], Output)]
    assert torch.equal(recording.values[output], interpret(built.graph, built.store, ids))
    for name in recording.spikes:
        (source,) = built.graph.inputs(name).values()
        x = recording.values[source]
        assert torch.equal(recording.values[name], phase_quantize(x, built.graph[name].params())), name
        assert torch.equal(recording.spikes[name], phase_encode(x, built.graph[name].params())[1]), name


def test_event_and_decoded_agree_node_by_node_with_the_same_signed_planes(float64_traces):
    graph, _, decoded, event = float64_traces
    for name, value in decoded.values.items():
        summed = event.values[name].sum(0) if name in event.stepped else event.values[name]
        scale = value.abs().max().clamp(min=1e-12) if value.is_floating_point() else 1
        assert ((summed - value).abs().max() / scale) < 1e-9, name
    negative = 0
    for name, spikes in event.spikes.items():
        assert spikes.dtype == torch.int8 and torch.equal(spikes, decoded.spikes[name]), name
        negative += int((spikes < 0).sum())
    assert negative > 0  # the model really emits −1 digits


def test_every_nonzero_digit_is_one_spike_and_each_fan_out_one_ac(built):
    ids = _ids()
    recording = run(built.graph, built.store, ids, "decoded")
    result = simulate(built.graph, built.store, ids, "decoded")
    site = "layers.0.mlp_norm"
    (node,) = [name for name in built.graph if getattr(built.graph[name], "site", None) == site]
    planes = recording.spikes[node]
    per_step = [float((plane != 0).sum()) for plane in planes]
    assert result.sites[site]["spikes_per_step"] == per_step
    gate = built.graph["layers.0.mlp.gate_proj"]
    assert result.snn["layers.0.mlp.gate_proj"].ac == sum(per_step) * gate.weight.shape[0]
    assert result.snn[node].spike_writes == sum(per_step)


def test_counts_are_the_same_in_both_modes(built):
    decoded = simulate(built.graph, built.store, _ids(), "decoded", dtype=torch.float64)
    event = simulate(built.graph, built.store, _ids(), "event", dtype=torch.float64)
    assert decoded.snn == event.snn and decoded.sites == event.sites


def test_masking_counts_a_minus_one_as_a_spike_and_is_the_same_in_both_modes(built):
    digits = torch.tensor([[0, -1, 0], [1, 0, 0], [-1, 1, 0], [1, -1, 1]], dtype=torch.int8)
    assert mask_late_spikes(digits, 2).tolist() == [[0, -1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, 1]]
    assert_masking_fewer_spikes_same_in_both_modes(built, _ids())
