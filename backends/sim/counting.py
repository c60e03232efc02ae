"""Count each node's operations and memory traffic under results.CONVENTION, for the SNN and its ANN counterpart.

Inputs are structural: each node's decoded output shape, and for every phase neuron its spike events — measured
0/1 spikes from a run, or expected spikes (the firing rate) in the analytic mode, as [T, *shape] planes or already
tallied (SpikeTally: totals per step and per query/key position, all the formulas read) — so measured and analytic
ledgers share every formula. A product of two spike trains is counted in its two-term causal form
out_t = S_A(t)·B_t + A_t·S_B(t−1) (the same sum as docs/method.md's three-term form): a spike of A selects entries of
B's running sum, a spike of B entries of A's, each once per output it reaches; each term's step weight d(t) is one
MAC per output and step. Real-valued (non-spiking) operands are dense: every element, every active step, MACs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

from spikecompile.errors import SpikecompileError
from spikecompile.ir import (
    ActivationMatmul, ElementwiseProduct, Embedding, Graph, Input, KVPrefix, Linear, MergeHeads, Nonlinear, Output,
    PhaseNeuron, ResidualAdd, RoPE, Rotation, SplitHeads,
)

from .results import Counts

NONLINEAR_MACS = {"rmsnorm": 2, "softmax": 3, "silu": 3}
"""MAC-equivalents per element and evaluation (results.CONVENTION)."""
ATTENTION = ("causal", "full")


def check_attention(attention: str) -> str:
    if attention not in ATTENTION:
        raise SpikecompileError(f"attention counting {attention!r}: choose one of {', '.join(ATTENTION)}")
    return attention


@dataclass(frozen=True)
class Structure:
    """A graph's wiring as the simulator walks it: the topological order, each node's producers by port and its
    number of consumers. Graph.inputs and the topological sort go through networkx views, and a run walks the
    graph twice (run, count) per window, so structure() keeps this per graph while its edges are unchanged."""

    order: tuple[str, ...]
    inputs: dict[str, dict[str, str]]
    consumers: dict[str, int]
    edges: tuple


_STRUCTURES: WeakKeyDictionary = WeakKeyDictionary()


def structure(graph: Graph) -> Structure:
    """The graph's Structure, cached per Graph and checked against its current edges (and ports) on every call."""
    edges = tuple(graph.edges())
    cached = _STRUCTURES.get(graph)
    if cached is not None and cached.edges == edges and len(cached.order) == len(graph):
        return cached
    order = tuple(graph.topological_order())
    built = Structure(order=order, inputs={name: graph.inputs(name) for name in order},
                      consumers={name: len(graph.consumers(name)) for name in order}, edges=edges)
    _STRUCTURES[graph] = built
    return built


def active_steps(graph: Graph) -> dict[str, int]:
    """How many steps carry values into each node's output: 1 for the token input and the embedding (whole at
    t = 0), T after a neuron, the most of its inputs otherwise."""
    wiring = structure(graph)
    steps = {}
    for name in wiring.order:
        node = graph[name]
        if isinstance(node, Input | Embedding):
            steps[name] = 1
        elif isinstance(node, PhaseNeuron):
            steps[name] = node.timesteps
        else:
            steps[name] = max(steps[source] for source in wiring.inputs[name].values())
    return steps


@dataclass(frozen=True)
class SpikeTally:
    """A neuron's spikes as the counters read them, as plain numbers (counts, or expected counts):

    per_step      spikes at each step t = 0..T−1, all elements
    per_position  spikes at each index of the output's second-to-last dim (a query or key position), summed over
                  the last dim, every step and the leading dims (one number for outputs of fewer than 2 dims)

    Python numbers rather than tensors: a run keeps every site's tally to the end, and hundreds of small
    long-lived tensors between the large temporaries pin glibc's heap (event mode then held gigabytes)."""

    per_step: tuple[float, ...]
    per_position: tuple[float, ...]

    @classmethod
    def of(cls, events: Tensor) -> SpikeTally:
        """The tally of spike planes (bool or 0./1.; a signed-digit neuron's int8 s_t, each nonzero one spike) or
        expected spikes [T, *shape]."""
        if not events.is_floating_point():
            events = events != 0
        exact = torch.int64 if not events.is_floating_point() else torch.float64
        dims = tuple(range(1, events.dim()))
        per_step = events.sum(dim=dims, dtype=exact) if dims else events.to(exact)
        rows = events.sum(dim=-1, dtype=exact).sum(0) if events.dim() > 1 else events.sum(dtype=exact)
        return cls.of_rows(per_step, rows)

    @classmethod
    def of_rows(cls, per_step: Tensor, rows: Tensor) -> SpikeTally:
        """From per-step totals [T] and spikes per row (summed over the last dim and the steps) [*shape[:-1]]."""
        positions = rows.reshape(-1, rows.shape[-1]).sum(0) if rows.dim() >= 1 else rows.reshape(1)
        return cls(tuple(per_step.tolist()), tuple(positions.tolist()))

    def total(self) -> float:
        return float(sum(self.per_step))


def count(graph: Graph, shapes: Mapping[str, tuple[int, ...]], events: Mapping[str, Tensor | SpikeTally],
          attention: str = "causal") -> tuple[dict[str, Counts], dict[str, Counts]]:
    """Per node: (SNN counts, ANN counts). shapes: each node's decoded output shape; events: per neuron node
    its spikes (or expected spikes) [T, *shape], or their SpikeTally."""
    check_attention(attention)
    active = active_steps(graph)
    wiring = structure(graph)
    snn, ann = {}, {}
    for name in wiring.order:
        node = graph[name]
        sources = wiring.inputs[name]
        operands = {port: _Operand(shapes[source], events.get(source), active[source])
                    for port, source in sources.items()}
        out = _Operand(shapes[name], events.get(name), active[name])
        snn[name], ann[name] = COUNTERS[type(node)](node, operands, out, active[name], attention)
    return snn, ann


class _Operand:
    """One input of a node: its shape, and its spike events when a neuron produces it (else real-valued)."""

    def __init__(self, shape: tuple[int, ...], events: Tensor | SpikeTally | None, steps: int):
        if isinstance(events, Tensor):
            events = SpikeTally.of(events)
        self.shape, self.events, self.steps = shape, events, steps

    @property
    def spiking(self) -> bool:
        return self.events is not None

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    def per_position(self) -> Tensor:
        """Events at each index of the second-to-last dim (a query or key position), summed over the last dim,
        every step and the leading dims: [shape[-2]] float64 (dense operands: every element at every active step)."""
        if self.events is not None:
            return torch.tensor(self.events.per_position, dtype=torch.float64)
        positions = self.shape[-2] if len(self.shape) >= 2 else 1
        return torch.full((positions,), float(self.elements * self.steps / positions), dtype=torch.float64)

    def total(self) -> float:
        return self.events.total() if self.events is not None else float(self.elements * self.steps)


def _driven(operand: _Operand, ops: float, outputs: int, steps: int) -> Counts:
    """`ops` operations driven by `operand`: when it spikes, accumulates (one 32-bit word and one spike bit read
    each) plus its step gain d(t), one MAC per output and step; when it is real, dense MACs."""
    if operand.spiking:
        return Counts(ac=ops, mac=outputs * steps, reads=ops, spike_reads=ops)
    return _real(mac=ops)


def _real(mac: float = 0.0, adds: float = 0.0, writes: float = 0.0) -> Counts:
    """Real-valued work: two 32-bit reads per MAC or add, `writes` 32-bit writes."""
    return Counts(mac=mac, ac=adds, reads=2 * (mac + adds), writes=writes)


def _int8_matmul(macs: float, writes: float) -> Counts:
    """An ANN matmul's real-valued work, its MACs marked as the ones an int8 ANN runs in 8 bit."""
    return _real(mac=macs, writes=writes) + Counts(int8_mac=macs)


def _linear(node: Linear, operands, out, steps, attention):
    x = operands["x"]
    rows, fan_in, fan_out = math.prod(out.shape[:-1]), x.shape[-1], out.shape[-1]
    outputs = rows * fan_out
    snn = _driven(x, x.total() * fan_out, outputs, steps) + Counts(writes=outputs * steps)
    ann = _int8_matmul(rows * fan_in * fan_out, writes=outputs)
    if node.bias is not None:  # enters once, at t = 0
        snn, ann = snn + _real(adds=outputs), ann + _real(adds=outputs)
    return snn, ann


def _embedding(node, operands, out, steps, attention):
    rows = math.prod(out.shape)
    lookup = Counts(reads=rows, writes=rows)
    return lookup, lookup


def rotation_ops_per_element(node: Rotation) -> int:
    """Operations per output element of x·H_n as the backends compute it, with n = 2^a·K as the node's construction
    factors it (describe_hadamard: 2^a is the largest power of two with a Hadamard K, not n's whole power of two):
    a butterfly stages (one add or subtract each) and K multiply-adds."""
    pow2, k = node.construction["pow2"], node.construction["k"]
    return (pow2.bit_length() - 1) + (k if k > 1 else 0)


def _rotation(node: Rotation, operands, out, steps, attention):
    per_element = rotation_ops_per_element(node)
    elements = math.prod(out.shape)
    return (_real(mac=elements * per_element * steps, writes=elements * steps),
            _real(mac=elements * per_element, writes=elements))


def _rope(node, operands, out, steps, attention):
    elements = math.prod(out.shape)
    return _real(mac=2 * elements * steps, writes=elements * steps), _real(mac=2 * elements, writes=elements)


def _free(node, operands, out, steps, attention):
    return Counts(), Counts()


def _kv_prefix(node: KVPrefix, operands, out, steps, attention):
    cache = math.prod(node.cache.shape)
    moved = Counts(reads=cache, writes=cache)
    return moved, moved


def _residual_add(node, operands, out, steps, attention):
    elements = math.prod(out.shape)
    return _real(adds=elements * steps, writes=elements * steps), _real(adds=elements, writes=elements)


def _nonlinear(node: Nonlinear, operands, out, steps, attention):
    """f evaluated on the running sum each active step: running-sum add, f, and the difference."""
    elements = math.prod(out.shape)
    per_element = NONLINEAR_MACS[node.function]
    snn = _real(mac=per_element * elements * steps, adds=2 * elements * (steps - 1), writes=elements * steps)
    return snn, _real(mac=per_element * elements, writes=elements)


@cache
def _visible_keys(queries: int, keys: int, attention: str) -> Tensor:
    """How many keys query i sees (the prefix keys come first). Cached: read only."""
    if attention == "full":
        return torch.full((queries,), float(keys))
    return torch.arange(queries, dtype=torch.float32) + (keys - queries) + 1


@cache
def _seeing_queries(queries: int, keys: int, attention: str) -> Tensor:
    """How many queries see key j. Cached: read only."""
    if attention == "full":
        return torch.full((keys,), float(queries))
    offset = keys - queries
    return (queries - (torch.arange(keys, dtype=torch.float32) - offset).clamp(min=0)).clamp(max=queries)


def _activation_matmul(node: ActivationMatmul, operands, out, steps, attention):
    a, b = operands["a"], operands["b"]
    if node.which == "qk":  # a [.., H, Sq, D], b [.., Hk, Sk, D] -> [.., H, Sq, Sk]
        queries, keys, depth = a.shape[-2], b.shape[-2], a.shape[-1]
        a_ops = (a.per_position() * _visible_keys(queries, keys, attention)).sum()
        b_ops = (b.per_position() * _seeing_queries(queries, keys, attention)).sum() * node.groups
    else:  # pv: a [.., H, Sq, Sk], b [.., Hk, Sk, D] -> [.., H, Sq, D]
        queries, keys, depth = a.shape[-2], a.shape[-1], b.shape[-1]
        a_ops = a.total() * depth if a.spiking else (a.per_position() * _visible_keys(queries, keys, attention)).sum() * depth
        b_ops = (b.per_position() * _seeing_queries(queries, keys, attention)).sum() * node.groups
    outputs = math.prod(out.shape)
    snn = (_driven(a, float(a_ops), outputs, steps) + _driven(b, float(b_ops), outputs, steps)
           + _running_sums(a) + _running_sums(b) + Counts(writes=outputs * steps))
    heads = math.prod(out.shape[:-2])
    pairs = float(_visible_keys(queries, keys, attention).sum()) * heads
    return snn, _int8_matmul(pairs * depth, writes=outputs)


def _running_sums(operand: _Operand) -> Counts:
    """S(t) = S(t−1) + X_t: one add and one 32-bit write per event (per element and step when real)."""
    events = operand.total()
    return Counts(ac=events, writes=events, reads=events)


def _elementwise_product(node, operands, out, steps, attention):
    a, b = operands["a"], operands["b"]
    elements = math.prod(out.shape)
    snn = (_driven(a, a.total(), elements, steps) + _driven(b, b.total(), elements, steps)
           + _running_sums(a) + _running_sums(b) + Counts(writes=elements * steps))
    return snn, _real(mac=elements, writes=elements)


RECIPROCAL_MACS = 6
"""MAC-equivalents of one 32-bit reciprocal: a table seed and three Newton–Raphson steps r ← r·(2 − τ·r), two
multiply-adds each (the usual way hardware without a divider divides; an estimate, not a measured figure)."""


def _phase_neuron(node: PhaseNeuron, operands, out, steps, attention):
    """Integrate every input step into the membrane, then T fire steps; one 1-bit write per spike. Per-token scales
    (token_levels) add, per row of N elements: the max of |x| (N compares, counted as adds), one reciprocal
    (RECIPROCAL_MACS) and 1/L, N multiplies x·(1/τ_row) with their writes, and T multiplies τ_row·d(t) for the
    step gains the receivers apply (the receivers' own MAC per output and step, _driven, is counted there)."""
    x = operands["x"]
    elements = math.prod(out.shape)
    integrate = elements * x.steps
    snn = Counts(ac=integrate, reads=integrate, neuron_steps=elements * node.timesteps, spike_writes=out.total())
    if node.token_levels:
        rows = elements // out.shape[-1] if out.shape else 1
        snn += _real(adds=elements, mac=elements + rows * (RECIPROCAL_MACS + 1 + node.timesteps), writes=elements)
    return snn, Counts()


def _output(node, operands, out, steps, attention):
    elements = math.prod(out.shape)
    return _real(adds=elements * (steps - 1), writes=elements), Counts(writes=elements)


COUNTERS = {
    Input: _free, Output: _output, Embedding: _embedding, Linear: _linear, Rotation: _rotation, RoPE: _rope,
    SplitHeads: _free, MergeHeads: _free, KVPrefix: _kv_prefix, ResidualAdd: _residual_add, Nonlinear: _nonlinear,
    ActivationMatmul: _activation_matmul, ElementwiseProduct: _elementwise_product, PhaseNeuron: _phase_neuron,
}
