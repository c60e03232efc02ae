"""The reference simulator backend: runs the IR in decoded or event mode, counts every node's operations and
memory traffic (results.CONVENTION) and prices them with a target's energy constants (ledger).

    simulate(graph, store, ids, mode="event") -> SimRun     one sequence: logits, counts, site activity
    simulate_windows(graph, store, windows, ...)             each window's SimRun, computed layer by layer
    simulate.run / counting.count / ledger.ledger           the three steps, usable on their own
    OPTIONS, check, build, report_lines                      `spikecompile build --target sim` (driver.py)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from spikecompile.ir import Graph, PhaseNeuron, layer_of, retyped

from .counting import check_attention, count
from .results import SimRun
from .simulate import output_of, run, run_windows


def simulate(graph: Graph, store, ids: Tensor | dict[str, Tensor], mode: str = "event", attention: str = "causal",
             mask_steps: int | None = None, dtype: torch.dtype | None = None) -> SimRun:
    """Run one sequence (batch 1) and count it. dtype: run in this float type (weights cast; float64 makes
    event and decoded modes agree to rounding)."""
    check_attention(attention)
    if dtype is not None:
        graph, store = retyped(graph, store, dtype)
    return counted(graph, run(graph, store, ids, mode, mask_steps, keep_values=False, spikes="tally"), attention)


def simulate_windows(graph: Graph, store, windows: list[Tensor], mode: str = "event", attention: str = "causal",
                     mask_steps: int | None = None, dtype: torch.dtype | None = None,
                     progress: Callable[[int], None] | None = None) -> Iterator[SimRun]:
    """simulate() of each window, yielded in order, computed layer by layer over the windows (simulate.run_windows:
    a group of windows reads each weight once per layer, not once per window)."""
    check_attention(attention)
    if dtype is not None:
        graph, store = retyped(graph, store, dtype)
    for recording in run_windows(graph, store, windows, mode, mask_steps, progress=progress):
        yield counted(graph, recording, attention)


def counted(graph: Graph, recording, attention: str) -> SimRun:
    """The SimRun of one sequence's recording (spikes as tallies): counts, site activity, logits."""
    shapes = recording.shapes
    snn, ann = count(graph, shapes, recording.spikes, attention)
    sites = {}
    for name, tally in recording.spikes.items():
        node: PhaseNeuron = graph[name]
        per_step = [float(spikes) for spikes in tally.per_step]
        elements = math.prod(shapes[name])
        sites[node.site] = {"node": name, "layer": layer_of(name), "kind": node.kind,
                            "timesteps": node.timesteps, "elements": elements, "spikes_per_step": per_step,
                            "firing_rate": sum(per_step) / (elements * node.timesteps)}
    tokens = _tokens(graph, shapes)
    return SimRun(tokens=tokens, snn=snn, ann=ann, layers={name: layer_of(name) for name in graph},
                  sites=sites, logits=output_of(graph, recording))


def _tokens(graph: Graph, shapes) -> int:
    """The sequence length: the last dim of the token ids, or the second-to-last of a float input."""
    from spikecompile.ir import Input

    name = next(name for name in graph if isinstance(graph[name], Input))
    return int(shapes[name][-1] if graph[name].dtype.startswith("int") else shapes[name][-2])


# Last: the driver's measure.py takes `simulate_windows` (the function above) from this package.
from .driver import OPTIONS, build, check, report_lines  # noqa: E402

__all__ = ["OPTIONS", "SimRun", "build", "check", "count", "report_lines", "run", "simulate", "simulate_windows"]
