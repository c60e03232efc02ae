"""--numerics loihi2: the fixed-point run lives in spikecompile.passes.fixed_point (below the backends, so that the
Lava backend's deployment report runs it too); re-exported here for the simulator and its callers."""

from spikecompile.passes.fixed_point import NUMERICS, OPS, FixedRun, fire, run_fixed

__all__ = ["NUMERICS", "OPS", "FixedRun", "fire", "run_fixed"]
