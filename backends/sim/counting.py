"""Count each node's operations and memory traffic under counts.CONVENTION, for the SNN and its ANN counterpart.

Inputs are structural: each node's decoded output shape, and for every phase neuron its spike events [T, *shape]
— measured 0/1 spikes from a run, or expected spikes (the firing rate) in the analytic mode — so measured and
analytic ledgers share every formula. A product of two spike trains is counted in its two-term causal form
out_t = S_A(t)·B_t + A_t·S_B(t−1) (the same sum as method.md's three-term form): a spike of A selects entries of
B's running sum, a spike of B entries of A's, each once per output it reaches; each term's step weight d(t) is one
MAC per output and step. Real-valued (non-spiking) operands are dense: every element, every active step, MACs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from spikecompile.errors import SpikecompileError
from spikecompile.ir import (
    ActivationMatmul, ElementwiseProduct, Embedding, Graph, Input, KVPrefix, Linear, MergeHeads, Nonlinear, Output,
    PhaseNeuron, ResidualAdd, RoPE, Rotation, SplitHeads,
)

from .counts import Counts

NONLINEAR_MACS = {"rmsnorm": 2, "softmax": 3, "silu": 3}
"""MAC-equivalents per element and evaluation (counts.CONVENTION)."""
ATTENTION = ("causal", "full")


def check_attention(attention: str) -> str:
    if attention not in ATTENTION:
        raise SpikecompileError(f"attention counting {attention!r}: choose one of {', '.join(ATTENTION)}")
    return attention


def active_steps(graph: Graph) -> dict[str, int]:
    """How many steps carry values into each node's output: 1 for the token input and the embedding (whole at
    t = 0), T after a neuron, the most of its inputs otherwise."""
    steps = {}
    for name in graph.topological_order():
        node = graph[name]
        if isinstance(node, Input | Embedding):
            steps[name] = 1
        elif isinstance(node, PhaseNeuron):
            steps[name] = node.timesteps
        else:
            steps[name] = max(steps[source] for source in graph.inputs(name).values())
    return steps


def count(graph: Graph, shapes: Mapping[str, tuple[int, ...]], events: Mapping[str, Tensor],
          attention: str = "causal") -> tuple[dict[str, Counts], dict[str, Counts]]:
    """Per node: (SNN counts, ANN counts). shapes: each node's decoded output shape; events: per neuron node
    its spikes (or expected spikes) [T, *shape]."""
    check_attention(attention)
    active = active_steps(graph)
    snn, ann = {}, {}
    for name in graph.topological_order():
        node = graph[name]
        sources = graph.inputs(name)
        operands = {port: _Operand(shapes[source], events.get(source), active[source])
                    for port, source in sources.items()}
        out = _Operand(shapes[name], events.get(name), active[name])
        snn[name], ann[name] = COUNTERS[type(node)](node, operands, out, active[name], attention)
    return snn, ann


class _Operand:
    """One input of a node: its shape, and its spike events when a neuron produces it (else real-valued)."""

    def __init__(self, shape: tuple[int, ...], events: Tensor | None, steps: int):
        self.shape, self.events, self.steps = shape, events, steps

    @property
    def spiking(self) -> bool:
        return self.events is not None

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    def per_row(self, reduce_last: int = 1) -> Tensor:
        """Events per step summed over the last `reduce_last` dims: [steps, *shape[:-reduce_last]] (dense
        operands: every element at every active step)."""
        if self.events is not None:
            return self.events.float().sum(dim=tuple(range(-reduce_last, 0)))
        kept = self.shape[:-reduce_last]
        return torch.full((self.steps, *kept), float(math.prod(self.shape[-reduce_last:])))

    def total(self) -> float:
        return float(self.events.float().sum()) if self.events is not None else float(self.elements * self.steps)


def _driven(operand: _Operand, ops: float, outputs: int, steps: int) -> Counts:
    """`ops` operations driven by `operand`: when it spikes, accumulates (one 32-bit word and one spike bit read
    each) plus its step gain d(t), one MAC per output and step; when it is real, dense MACs."""
    if operand.spiking:
        return Counts(ac=ops, mac=outputs * steps, reads=ops, spike_reads=ops)
    return _real(mac=ops)


def _real(mac: float = 0.0, adds: float = 0.0, writes: float = 0.0) -> Counts:
    """Real-valued work: two 32-bit reads per MAC or add, `writes` 32-bit writes."""
    return Counts(mac=mac, ac=adds, reads=2 * (mac + adds), writes=writes)


def _linear(node: Linear, operands, out, steps, attention):
    x = operands["x"]
    rows, fan_in, fan_out = math.prod(out.shape[:-1]), x.shape[-1], out.shape[-1]
    outputs = rows * fan_out
    snn = _driven(x, x.total() * fan_out, outputs, steps) + Counts(writes=outputs * steps)
    ann = _real(mac=rows * fan_in * fan_out, writes=outputs)
    if node.bias is not None:  # enters once, at t = 0
        snn, ann = snn + _real(adds=outputs), ann + _real(adds=outputs)
    return snn, ann


def _embedding(node, operands, out, steps, attention):
    rows = math.prod(out.shape)
    lookup = Counts(reads=rows, writes=rows)
    return lookup, lookup


def _rotation(node: Rotation, operands, out, steps, attention):
    blocks = node.n
    power = (blocks & -blocks).bit_length() - 1  # n = 2^a · K
    per_element = power + blocks // 2 ** power
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


def _visible_keys(queries: int, keys: int, attention: str) -> Tensor:
    """How many keys query i sees (the prefix keys come first)."""
    if attention == "full":
        return torch.full((queries,), float(keys))
    return torch.arange(queries, dtype=torch.float32) + (keys - queries) + 1


def _seeing_queries(queries: int, keys: int, attention: str) -> Tensor:
    """How many queries see key j."""
    if attention == "full":
        return torch.full((keys,), float(queries))
    offset = keys - queries
    return (queries - (torch.arange(keys, dtype=torch.float32) - offset).clamp(min=0)).clamp(max=queries)


def _activation_matmul(node: ActivationMatmul, operands, out, steps, attention):
    a, b = operands["a"], operands["b"]
    if node.which == "qk":  # a [.., H, Sq, D], b [.., Hk, Sk, D] -> [.., H, Sq, Sk]
        queries, keys, depth = a.shape[-2], b.shape[-2], a.shape[-1]
        a_ops = (a.per_row(1) * _visible_keys(queries, keys, attention)).sum()
        b_ops = (b.per_row(1) * _seeing_queries(queries, keys, attention)).sum() * node.groups
    else:  # pv: a [.., H, Sq, Sk], b [.., Hk, Sk, D] -> [.., H, Sq, D]
        queries, keys, depth = a.shape[-2], a.shape[-1], b.shape[-1]
        a_ops = a.total() * depth if a.spiking else (a.per_row(1) * _visible_keys(queries, keys, attention)).sum() * depth
        b_ops = (b.per_row(1) * _seeing_queries(queries, keys, attention)).sum() * node.groups
    outputs = math.prod(out.shape)
    snn = (_driven(a, float(a_ops), outputs, steps) + _driven(b, float(b_ops), outputs, steps)
           + _running_sums(a) + _running_sums(b) + Counts(writes=outputs * steps))
    heads = math.prod(out.shape[:-2])
    pairs = float(_visible_keys(queries, keys, attention).sum()) * heads
    return snn, _real(mac=pairs * depth, writes=outputs)


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


def _phase_neuron(node: PhaseNeuron, operands, out, steps, attention):
    """Integrate every input step into the membrane, then T fire steps; one 1-bit write per spike."""
    x = operands["x"]
    integrate = math.prod(out.shape) * x.steps
    return (Counts(ac=integrate, reads=integrate, neuron_steps=math.prod(out.shape) * node.timesteps,
                   spike_writes=out.total()),
            Counts())


def _output(node, operands, out, steps, attention):
    elements = math.prod(out.shape)
    return _real(adds=elements * (steps - 1), writes=elements), Counts(writes=elements)


COUNTERS = {
    Input: _free, Output: _output, Embedding: _embedding, Linear: _linear, Rotation: _rotation, RoPE: _rope,
    SplitHeads: _free, MergeHeads: _free, KVPrefix: _kv_prefix, ResidualAdd: _residual_add, Nonlinear: _nonlinear,
    ActivationMatmul: _activation_matmul, ElementwiseProduct: _elementwise_product, PhaseNeuron: _phase_neuron,
}
