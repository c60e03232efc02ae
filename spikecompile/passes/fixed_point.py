"""The graph as deployed on Loihi 2 (passes.loihi_mapping.deployed_formats), bit for bit what
the Lava backend's fixed_pt program computes, run decoded-equivalent at torch speed: `build --target sim --numerics loihi2` and the deployment report of
`build --target lava` (passes.deployment) both run it (here, below the backends, so that both may).

Why decoded is exact here: a spike carries the graded payload σ·D_t (integers), so a synapse's window
Σ_t A_t = Σ_j 2m_ij·σ_j·Σ_t D_t·s_j(t) = 2m @ c, c the integer code of each source neuron, whatever the step
order; the receiver rounds once, at the end of its window (u = rint(g·Σ_t A_t), saturated), and every op runs once
per window on its inputs' window values in float64 (hardware.loihi2.OP_FORMAT). 2m @ c stays below 2^53 and is
computed exactly in float64.

    neuron   u = sat(rint(g·a)): a = Σ_t A_t with the synapse's per-row gain (hardware.loihi2.synapse_gain), or an
             op's value with g = gain(1/unit); σ = sign(u), r = |u|; for t < T: s_t = [r > θ'(t)] ∧ budget,
             r ← r − h(t)·s_t; c = σ·Σ_t D_t·s_t; an op reads c·δ (a signed-digit site: r = u, s_t ∈ {−1, 0, +1},
             c = Σ_t D_t·s_t; fire_signed)
    synapse  Σ_t A_t = 2m @ c (float64, exact integers); an op reads (s_i·δ/2)·Σ_t A_t
    op       float64, the Lava program's numpy op (backends/lava/runtime/processes.py OPS) in torch, expression
             for expression (OPS below: change them together)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from ..errors import SpikecompileError
from ..hardware.loihi2 import gain, synapse_gain
from ..ir import (
    ActivationMatmul, ElementwiseProduct, Embedding, Graph, KVPrefix, MergeHeads, Nonlinear, Output, PhaseNeuron,
    ResidualAdd, RoPE, Rotation, SplitHeads,
)
from ..ir.interpret import graph_inputs
from .loihi_mapping import Formats

NUMERICS = ("float", "loihi2")


@dataclasses.dataclass
class FixedRun:
    """One fixed-point run: node values (float64; a synapse's as the window sums Σ_t A_t), and per neuron node its
    spike count per neuron, integer potential u at the start of firing, residual r at the end, the spike count
    per step, and its saturations (by site); per synapse the window sums Σ_t A_t beyond its accumulator's range
    (overflowed; held exactly, as Lava's fixed_pt holds them: the count says what a saturating accumulator would
    change)."""

    values: dict[str, Tensor]
    counts: dict[str, Tensor]
    potentials: dict[str, Tensor]
    residuals: dict[str, Tensor]
    per_step: dict[str, Tensor]
    saturated: dict[str, int]
    window_sums: dict[str, Tensor]
    overflowed: dict[str, int] = dataclasses.field(default_factory=dict)

    def output(self, graph: Graph) -> Tensor:
        (name,) = [name for name in graph if isinstance(graph[name], Output)]
        return self.values[name]


def fire(u: Tensor, site) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(code c = σ·Σ_t D_t·s_t, spike count per neuron, final residual r, spikes per step) of integer potentials u
    (int64) under the site's integer thresholds, resets, payload and budget."""
    if site.signed_digits:
        return fire_signed(u, site)
    sign, residual = torch.sign(u), u.abs()
    code, count = torch.zeros_like(u), torch.zeros_like(u)
    per_step = torch.zeros(len(site.threshold), dtype=torch.int64)
    for t, (threshold, reset, payload) in enumerate(zip(site.threshold.tolist(), site.reset.tolist(),
                                                        site.payload.tolist())):
        spikes = residual > threshold
        if site.max_spikes:
            spikes &= count < site.max_spikes
        spikes = spikes.long()
        residual -= reset * spikes
        count += spikes
        code += payload * spikes
        per_step[t] = spikes.sum()
    return sign * code, count, residual, per_step


def fire_signed(u: Tensor, site) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fire() for a signed-digit site: r = u keeps its sign, s_t = [r > θ'(t)] − [−r > θ'(t)] (masked once K steps
    were nonzero), r ← r − h(t)·s_t, c = Σ_t D_t·s_t; the count and the spikes per step count nonzero digits."""
    residual, code, count = u.clone(), torch.zeros_like(u), torch.zeros_like(u)
    per_step = torch.zeros(len(site.threshold), dtype=torch.int64)
    for t, (threshold, reset, payload) in enumerate(zip(site.threshold.tolist(), site.reset.tolist(),
                                                        site.payload.tolist())):
        digits = (residual > threshold).long() - (-residual > threshold).long()
        if site.max_spikes:
            digits *= (count < site.max_spikes).long()
        residual -= reset * digits
        count += digits.abs()
        code += payload * digits
        per_step[t] = digits.abs().sum()
    return code, count, residual, per_step


@torch.no_grad()
def run_fixed(graph: Graph, store, inputs, formats: Formats) -> FixedRun:
    """Run `graph` on `inputs` (token ids, or values by Input name) in its deployed formats."""
    _STORE[0] = store
    values = {name: value.double() if value.is_floating_point() else value
              for name, value in graph_inputs(graph, inputs).items()}
    run = FixedRun(values, {}, {}, {}, {}, {}, {})
    sums: dict[str, Tensor] = {}  # synapse -> Σ_t A_t

    def value(source: str, receiver=None) -> Tensor:
        """What `source` delivers to an op (receiver None) as a float64 value."""
        if source in sums:
            synapse = formats.synapses[source]
            row_gain = torch.from_numpy(synapse_gain(synapse, formats.sites[formats.sources[source]], None))
            return sums[source] * row_gain
        return values[source]

    for name in graph.topological_order():
        if name in values:
            continue
        node = graph[name]
        sources = graph.inputs(name)
        try:
            if isinstance(node, PhaseNeuron):
                values[name] = _neuron(name, sources["x"], formats, sums, values, run)
            elif name in formats.synapses:
                mantissa = torch.from_numpy(formats.synapses[name].mantissa.astype(np.float64) * 2)
                sums[name] = torch.nn.functional.linear(run.window_sums[sources["x"]], mantissa)
                limit = 2 ** (formats.synapses[name].accumulator_bits - 1) - 1
                run.overflowed[name] = int((sums[name].abs() > limit).sum())
            else:
                values[name] = OPS[type(node)](node, *(value(source) for source in sources.values()))
        except (RuntimeError, ValueError) as error:
            raise SpikecompileError(f"node {name}: {type(node).__name__}: {error}") from None
    run.window_sums.update(sums)
    return run


def _neuron(name: str, source: str, formats: Formats, sums: dict, values: dict, run: FixedRun) -> Tensor:
    """Integrate, round, saturate and fire one site; keep its record in `run`; return c·δ (what an op reads)."""
    site = formats.sites[name]
    if source in sums:
        synapse = formats.synapses[source]
        scaled = sums[source] * torch.from_numpy(synapse_gain(synapse, formats.sites[formats.sources[source]], site))
    else:
        scaled = values[source].double() * float(gain(1.0 / site.unit))
    u = torch.round(scaled)
    run.saturated[site.site] = run.saturated.get(site.site, 0) + int((u.abs() > site.limit).sum())
    u = u.clamp(-site.limit, site.limit).long()
    code, count, residual, per_step = fire(u.reshape(-1), site)
    run.counts[name], run.potentials[name], run.residuals[name], run.per_step[name] = count, u.reshape(-1), \
        residual, per_step
    code = code.reshape(u.shape).double()
    run.window_sums[name] = code  # what a synapse reads: the integer codes
    return code * site.delta


# ---- the ops, as the Lava program's numpy OPS compute them (float64, same expressions) --------------------------

def _rmsnorm(node: Nonlinear, x: Tensor) -> Tensor:
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + node.eps)
    return y * node.weight.resolve(_STORE[0]).double() if node.weight is not None else y


def _softmax(x: Tensor, causal: bool) -> Tensor:
    if causal:
        queries, keys = x.shape[-2:]
        future = torch.arange(keys)[None, :] > torch.arange(queries)[:, None] + (keys - queries)
        x = x.masked_fill(future, float("-inf"))
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def _nonlinear(node: Nonlinear, x: Tensor) -> Tensor:
    if node.function == "rmsnorm":
        return _rmsnorm(node, x)
    if node.function == "softmax":
        return _softmax(x, node.causal)
    return x / (1.0 + torch.exp(-x))


def _repeat_heads(b: Tensor, groups: int) -> Tensor:
    return b.repeat_interleave(groups, dim=-3) if groups > 1 else b


def _activation_matmul(node: ActivationMatmul, a: Tensor, b: Tensor) -> Tensor:
    b = _repeat_heads(b, node.groups)
    return node.scaling * (a @ (b.transpose(-1, -2) if node.transpose_b else b))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(node: RoPE, x: Tensor) -> Tensor:
    cos, sin = (table.double() for table in node.tables(x.shape[-2]))
    return x * cos + _rotate_half(x) * sin


def _rotation(node: Rotation, x: Tensor) -> Tensor:
    n = node.n
    return (x.reshape(*x.shape[:-1], -1, n) @ node.matrix()).reshape(x.shape)


def _kv_prefix(node: KVPrefix, x: Tensor) -> Tensor:
    cache = node.cache.resolve(_STORE[0]).double()
    return torch.cat((cache.expand(*x.shape[:-3], *cache.shape), x), dim=-2)


def _split_heads(node: SplitHeads, x: Tensor) -> Tensor:
    return x.reshape(*x.shape[:-1], node.heads, node.head_dim).transpose(-3, -2)


def _merge_heads(node: MergeHeads, x: Tensor) -> Tensor:
    x = x.transpose(-3, -2)
    return x.reshape(*x.shape[:-2], node.heads * node.head_dim)


_STORE: list = [None]  # the run's store (arrays read as float64), for the ops that read arrays (set by run_fixed)

OPS = {
    Nonlinear: _nonlinear,
    ActivationMatmul: _activation_matmul,
    ElementwiseProduct: lambda node, a, b: a * b,
    RoPE: _rope,
    Rotation: _rotation,
    KVPrefix: _kv_prefix,
    SplitHeads: _split_heads,
    MergeHeads: _merge_heads,
    Embedding: lambda node, ids: node.weight.resolve(_STORE[0]).double()[ids.long()],
    ResidualAdd: lambda node, a, b: a + b,
    Output: lambda node, x: x,
}
"""Each non-synaptic IR node type's op in float64 (processes.OPS of the Lava runtime, the same expressions)."""
