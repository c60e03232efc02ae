"""Analytic mode: the counts of a model known only by its config, at a chosen sequence length and firing rates.

The graph is traced from the config alone (spikecompile.analytic.config_graph: weights on PyTorch's meta
device). Each spike site's events are its expected spikes — the firing rate of its site kind at every element and step — and go through the same counting code as a measured run, so a measured and an analytic ledger of
one model differ only where the spikes are not spread uniformly (e.g. over query rows under a causal mask).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from spikecompile.errors import SpikecompileError
from spikecompile.ir import Graph, PhaseNeuron, layer_of, validate
from spikecompile.ir.shapes import bind

from .counting import SpikeTally, check_attention, count
from .results import SimRun

def analytic_run(graph: Graph, seq_len: int, rates: Mapping[str, float], attention: str = "causal") -> SimRun:
    """Counts for one sequence of `seq_len` tokens with the firing rate rates[kind] at every site of that kind
    (rates[site], where given, at that one site: a per-site allocation)."""
    check_attention(attention)
    if not (isinstance(seq_len, int) and seq_len >= 1):
        raise SpikecompileError(f"sequence length {seq_len!r}: must be an int ≥ 1")
    types = validate(graph)
    shapes = {name: tuple(bind(dim, {"batch": 1, "seq": seq_len}) for dim in types[name].shape) for name in graph}
    events, sites = {}, {}
    for name in graph:
        node = graph[name]
        if not isinstance(node, PhaseNeuron):
            continue
        rate = _rate(rates, node.site if node.site in rates else node.kind)
        shape = shapes[name]
        elements = int(torch.Size(shape).numel())
        positions = shape[-2] if len(shape) >= 2 else 1
        events[name] = SpikeTally(per_step=(rate * elements,) * node.timesteps,
                                  per_position=(rate * node.timesteps * elements / positions,) * positions)
        sites[node.site] = {"node": name, "layer": layer_of(name), "kind": node.kind,
                            "timesteps": node.timesteps, "elements": elements,
                            "spikes_per_step": [rate * elements] * node.timesteps, "firing_rate": rate}
    snn, ann = count(graph, shapes, events, attention)
    return SimRun(tokens=seq_len, snn=snn, ann=ann, layers={name: layer_of(name) for name in graph}, sites=sites)


def _rate(rates: Mapping[str, float], kind: str) -> float:
    if kind not in rates:
        raise SpikecompileError(f"firing rates: no rate for site kind {kind} (given: {', '.join(sorted(rates))})")
    rate = rates[kind]
    if not (isinstance(rate, int | float) and 0 <= rate <= 1):
        raise SpikecompileError(f"firing rates: {kind} = {rate!r} is not a rate in [0, 1]")
    return float(rate)
