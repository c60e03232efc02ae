"""What passes over a traced model share besides the graph: PassManager.run(graph, shared=CompileInputs(...))."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class CompileInputs:
    """store: the tensors the graph's TensorRefs name (trace's store). A pass that derives a tensor (a folded
    weight) adds it under a new key and points its node there; it never changes a tensor already in the store,
    so the graph it was given stays valid.
    samples: each spike site's calibration samples [N] (model.pt sites[name]["samples"]), for passes that refit.
    seed: for passes that draw random numbers.
    release_replaced: the caller needs no tensor a pass replaces (a build that traced the model only for these
    passes): a pass may drop a replaced tensor from the store once no node of its result references it, so a big
    model's weights are never held twice. The graph the pass was given is then no longer runnable.
    """

    store: dict[str, Tensor]
    samples: Mapping[str, Tensor] = field(default_factory=dict)
    seed: int = 0
    release_replaced: bool = False
