"""The graph as deployed on Loihi 2 (passes.loihi_mapping.deployed_formats), bit for bit what
the Lava backend's fixed_pt program computes, run decoded-equivalent at torch speed: `build --target sim --numerics loihi2` and the deployment report of
`build --target lava` (passes.deployment) both run it (here, below the backends, so that both may).

Why decoded is exact here: a spike carries the graded payload σ·D_t (integers), so a synapse's window
Σ_t A_t = Σ_j 2m_ij·σ_j·Σ_t D_t·s_j(t) = 2m @ c, c the integer code of each source neuron, whatever the step
order; the receiver rounds once, at the end of its window (u = rint(g·Σ_t A_t), saturated), and every op runs once
per window on its inputs' window values in float64 (hardware.loihi2.OP_FORMAT). 2m @ c is computed exactly as int8
GEMMs of signed base-256 digits of c and m (synapse_sums).

    neuron   u = sat(rint(g·a)): a = Σ_t A_t with the synapse's per-row gain (hardware.loihi2.synapse_gain), or an
             op's value with g = gain(1/unit); σ = sign(u), r = |u|; for t < T: s_t = [r > θ'(t)] ∧ budget,
             r ← r − h(t)·s_t; c = σ·Σ_t D_t·s_t; an op reads c·δ
    synapse  Σ_t A_t = 2m @ c (exact integers: int32, or float64 past int32's bound); an op reads (s_i·δ/2)·Σ_t A_t
    op       float64, the Lava program's numpy op (backends/lava/runtime/processes.py OPS) in torch, expression
             for expression (OPS below: change them together)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

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
from ..ir.linear import rotate_by_factors
from ..neuron import kernel
from .loihi_mapping import Formats

NUMERICS = ("float", "loihi2")


@dataclasses.dataclass
class FixedRun:
    """One fixed-point run. Always: the output's values, per neuron node its saturations (by site) and its neuron
    count (`sizes`), and per synapse its window sums Σ_t A_t beyond its accumulator's range
    (overflowed; held exactly, as Lava's fixed_pt holds them: the count says what a saturating accumulator would
    change), its largest |Σ_t A_t| (`peaks`) and its sum count (`sizes`). With records: every node's values
    (float64), and per neuron node its spikes per step, its spike count per neuron, integer potential u at the start of firing, residual
    r at the end, and the integer codes it sends (`window_sums`, beside the synapses' Σ_t A_t)."""

    values: dict[str, Tensor]
    per_step: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    saturated: dict[str, int] = dataclasses.field(default_factory=dict)
    overflowed: dict[str, int] = dataclasses.field(default_factory=dict)
    peaks: dict[str, int] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    counts: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    potentials: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    residuals: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    window_sums: dict[str, Tensor] = dataclasses.field(default_factory=dict)

    def output(self, graph: Graph) -> Tensor:
        (name,) = [name for name in graph if isinstance(graph[name], Output)]
        return self.values[name]


@dataclasses.dataclass(frozen=True)
class FiringTable:
    """A site's whole integer firing rule as intervals of its potential u: u in [low[k], low[k+1]) fires the digit
    pattern pattern[k] (T steps), sends the code c = code[k], has fired count[k] spikes and leaves the residual
    |u| − reset_sum[k] (signed digits: u − reset_sum[k]).

    Exact, not an approximation: each step's digit is a threshold test on the residual r_t = r − Σ_{t'<t} h(t')·s_t',
    i.e. on r itself once the digits so far are known, so every digit pattern is an interval of r and splitting the
    range step by step finds them in order (at most 2^T; 3^T signed).
      unsigned  r = |u|: s_t = [r_t > θ'(t)] ∧ budget, c = σ·Σ_t D_t·s_t; split [0, limit], then u < 0 mirrors it with
                c negated (u = 0 fires as r = 0 does, but sends σ·… = 0)
      signed    r = u: s_t = [r_t > θ'(t)] − [−r_t > θ'(t)] (0 once K digits were nonzero), c = Σ_t D_t·s_t; split
                [−limit, limit]
    Lows and codes are float64 (exact: integers below 2^53), so a rounded float64 potential is looked up as it is."""

    low: Tensor  # float64 [K], low[0] = −limit
    code: Tensor  # float64 [K]
    count: Tensor  # int64 [K]
    reset_sum: Tensor  # int64 [K]
    pattern: Tensor  # int64 [K, T], |s_t|
    signed: bool = False


def firing_table(site) -> FiringTable:
    """The intervals of `site` (a hardware.loihi2.SiteFormat) over u in [−site.limit, site.limit]."""
    thresholds, resets, payloads = site.threshold.tolist(), site.reset.tolist(), site.payload.tolist()
    steps, budget, signed = len(thresholds), site.max_spikes, site.signed_digits
    leaves: list[tuple[int, int, int, int, int, tuple[int, ...]]] = []  # (low, high, code, count, resets, pattern)

    def digit(value: int, t: int, reset_sum: int) -> int:
        residual = value - reset_sum
        return int(residual > thresholds[t]) - (int(-residual > thresholds[t]) if signed else 0)

    def split(low: int, high: int, t: int, reset_sum: int, count: int, code: int, pattern: tuple[int, ...]):
        if t == steps:
            leaves.append((low, high, code, count, reset_sum, pattern))
            return
        if budget and count >= budget:
            split(low, high, t + 1, reset_sum, count, code, pattern + (0,))
            return
        cut = thresholds[t] + reset_sum  # +1 from cut + 1 up; signed: −1 up to 2·reset_sum − cut − 1
        cuts = (cut + 1, 2 * reset_sum - cut) if signed else (cut + 1,)
        edges = sorted({low, *(edge for edge in cuts if low < edge <= high)})
        for start, end in zip(edges, [*edges[1:], high + 1]):
            s = digit(start, t, reset_sum)
            split(start, end - 1, t + 1, reset_sum + resets[t] * s, count + abs(s), code + payloads[t] * s,
                  pattern + (abs(s),))

    if signed:
        split(-site.limit, site.limit, 0, 0, 0, 0, ())
        low, code, count, reset_sum, pattern = zip(*[(low, *rest) for low, high, *rest in leaves])
    else:
        split(0, site.limit, 0, 0, 0, 0, ())
        mirrored = [(-high, -code, *rest) for low, high, code, *rest in reversed(leaves) if high > 0]  # u ≤ −1
        _, high, code, *rest = leaves[0]
        zero = [(0, 0, *rest)] + ([(1, code, *rest)] if high > 0 else [])  # σ = sign(0) = 0: u = 0 sends 0
        low, code, count, reset_sum, pattern = zip(*mirrored, *zero, *[(low, code, *rest) for low, high, code, *rest
                                                                        in leaves[1:]])
    return FiringTable(torch.tensor(low, dtype=torch.float64), torch.tensor(code, dtype=torch.float64),
                       *(torch.tensor(column, dtype=torch.int64) for column in (count, reset_sum, pattern)), signed)


def fire(u: Tensor, table: FiringTable) -> tuple[Tensor, Tensor]:
    """(code c = σ·Σ_t D_t·s_t as float64, interval index) of integer-valued float64 potentials u, |u| ≤ limit:
    one lookup per neuron in its site's firing_table (the same integers as stepping r through the T steps)."""
    interval = torch.searchsorted(table.low, u, right=True) - 1
    return table.code[interval], interval


@torch.no_grad()
def run_fixed(graph: Graph, store, inputs, formats: Formats, records: bool = True) -> FixedRun:
    """Run `graph` on `inputs` (token ids, or values by Input name) in its deployed formats; without `records`, keep
    only what FixedRun always holds and free each value once its last reader has run."""
    _STORE[0] = store
    values = {name: value.double() if value.is_floating_point() else value
              for name, value in graph_inputs(graph, inputs).items()}
    run = FixedRun(values)
    codes: dict[str, Tensor] = {}  # neuron -> the integer codes c it sends, as int8 digit planes (synapse_sums)
    sums: dict[str, Tensor] = {}  # synapse -> Σ_t A_t
    readers = {name: len(graph.consumers(name)) for name in graph}

    def value(source: str) -> Tensor:
        """What `source` delivers to an op as a float64 value."""
        return sums[source] * _synapse_gain(formats, source, None) if source in sums else values[source]

    for name in graph.topological_order():
        if name in values:
            continue
        node = graph[name]
        sources = graph.inputs(name)
        try:
            if isinstance(node, PhaseNeuron):
                source = sources["x"]
                ops_read = any(consumer not in formats.synapses for consumer in graph.consumers(name))
                # only this neuron reads a fresh input: its values may go where the input was
                in_place = not records and isinstance(graph[source], _FRESH) and graph.consumers(source) == [name]
                fired_value, codes[name] = _neuron(name, source, formats, sums, values, run, records, ops_read,
                                                   in_place)
                if fired_value is not None:
                    values[name] = fired_value
            elif name in formats.synapses:
                source = sources["x"]
                plane_peaks = _derived(formats, ("plane peaks", source), lambda: tuple(
                    int(peak) for peak in _code_digits(formats, source).long().abs().amax(-1)))
                weights = _derived(formats, ("m", name), lambda: IntegerWeights.of(formats.synapses[name].mantissa))
                sums[name] = synapse_sums(codes[source], plane_peaks, weights)
                _tally_synapse(name, sums[name], formats, run)
            else:
                values[name] = OPS[type(node)](node, *(value(source) for source in sources.values()))
        except (RuntimeError, ValueError) as error:
            raise SpikecompileError(f"node {name}: {type(node).__name__}: {error}") from None
        if not records:
            for source in sources.values():
                readers[source] -= 1
                if readers[source] == 0:
                    for held in (values, codes, sums):
                        held.pop(source, None)
    if records:
        run.window_sums.update(sums)
    return run


DIGIT = 256
"""Base of the signed digits that split integer codes and mantissas into int8 for the integer GEMM (synapse_sums)."""


@dataclasses.dataclass(frozen=True)
class IntegerWeights:
    """A synapse's mantissa m [out, in] as signed base-256 digits m = Σ_b 256^b·m_b, each int8 and transposed
    [in, out] for torch._int_mm (an 8-bit mantissa is one digit), with each digit's largest row sum max_i Σ_k |m_b,ik|
    (what bounds a GEMM of it)."""

    digits: tuple[Tensor, ...]
    row_peaks: tuple[int, ...]

    @classmethod
    def of(cls, mantissa: np.ndarray) -> "IntegerWeights":
        planes = signed_digits(torch.from_numpy(mantissa.astype(np.float64)),
                               digit_count(float(np.abs(mantissa).max(initial=0))))
        return cls(tuple(plane.t().contiguous() for plane in planes),
                   tuple(int(plane.long().abs().sum(-1).max()) if plane.numel() else 0 for plane in planes))


def synapse_sums(code_planes: Tensor, plane_peaks: tuple[int, ...], weights: IntegerWeights) -> Tensor:
    """Σ_t A_t = 2m @ c [..., out] exactly, from the integer codes c as int8 digit planes c_a [D, ..., in]
    (c = Σ_a 256^a·c_a, |c_a| ≤ plane_peaks[a]) and m's digits (IntegerWeights): each digit product an int8 GEMM
    with an int32 accumulator (exact: |Σ_k c_a·m_b| ≤ 2^14·in < 2^31), several times faster than one float64 GEMM.
    int32 when Σ_ab 2·256^(a+b)·plane_peaks[a]·row_peaks[b] < 2^31 bounds every partial sum, else float64 (exact:
    the sums are integers below 2^53). torch._int_mm where it runs, else the same integers from float64 GEMMs."""
    inner, out = code_planes.shape[-1], weights.digits[0].shape[-1]
    flat = code_planes.reshape(code_planes.shape[0], -1, inner)
    bound = sum(2 * DIGIT ** (a + b) * peak * row for a, peak in enumerate(plane_peaks)
                for b, row in enumerate(weights.row_peaks))
    exact_int32 = bound < 2 ** 31
    total = None
    for a, plane in enumerate(flat):
        for b, weight in enumerate(weights.digits):
            product = _int_mm(plane, weight, plane_peaks[a] * weights.row_peaks[b])
            scale = 2 * DIGIT ** (a + b)
            if exact_int32:  # a float GEMM's integers convert exactly: each is below the bound
                product = product.to(torch.int32)
                total = product.mul_(scale) if total is None else total.add_(product, alpha=scale)
            else:
                product = product.double()
                total = product.mul_(scale) if total is None else total.double().add_(product, alpha=scale)
    return total.reshape(*code_planes.shape[1:-1], out)


def _int_mm(a: Tensor, b: Tensor, peak: int) -> Tensor:
    """a @ b for int8 a [rows, in], b [in, out] whose every partial sum is at most `peak` in magnitude: the same
    integers from torch._int_mm (int32) where it is faster than a float GEMM on this CPU (int8_gemm_is_fast), else
    from a float32 GEMM where peak < 2^24 (every partial sum an integer float32 holds exactly), else float64;
    float64 too where torch._int_mm is missing or refuses, for an empty a, or where `in` is so wide that an int32 sum
    could overflow."""
    if a.shape[0] and a.shape[1] < 2 ** 31 // (128 * 128) and int8_gemm_is_fast():
        try:
            return torch._int_mm(a, b)
        except RuntimeError:
            pass
    if peak < 2 ** 24:
        return a.float() @ b.float()
    return a.double() @ b.double()


@functools.cache
def int8_gemm_is_fast() -> bool:
    """Whether torch._int_mm beats a float32 GEMM of the same int8 matrices here, timed once per process (best of
    three, 64 × 512 @ 512 × 256). CPUs with int8 dot-product instructions (VNNI, AMX) run it several times faster than
    float64; on an AVX2-only AMD EPYC it ran 27× slower (0.91 s against 0.033 s for 512 × 576 @ 576 × 1536). The
    integers are the same either way: only the speed is chosen."""
    if not hasattr(torch, "_int_mm"):
        return False
    a, b = torch.ones(64, 512, dtype=torch.int8), torch.ones(512, 256, dtype=torch.int8)

    def fastest(product) -> float:
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
        return best

    try:
        return fastest(lambda: torch._int_mm(a, b)) < fastest(lambda: a.float() @ b.float())
    except RuntimeError:
        return False


def digit_count(peak: float) -> int:
    """How many signed base-256 digits (each in [−128, 127]) hold the integers |x| ≤ peak."""
    count, reach = 1, 127
    while peak > reach:
        count, reach = count + 1, reach * DIGIT + 127
    return count


def signed_digits(x: Tensor, count: int) -> Tensor:
    """Integer-valued float64 x as `count` int8 digit planes d_a [count, *x.shape], d_a in [−128, 127] and
    x = Σ_a 256^a·d_a (the last digit takes what is left: `count` must be digit_count of |x|'s peak)."""
    digits = []
    for index in range(count - 1):
        quotient = torch.floor((x + DIGIT // 2) / DIGIT)
        digits.append(x - quotient * DIGIT)
        x = quotient
    return torch.stack([*digits, x]).to(torch.int8)


def _tally_synapse(name: str, window_sums: Tensor, formats: Formats, run: FixedRun) -> None:
    """Keep a synapse's peak |Σ_t A_t|, its sum count and how many sums overflow its accumulator."""
    limit = 2 ** (formats.synapses[name].accumulator_bits - 1) - 1
    low, high = torch.aminmax(window_sums) if window_sums.numel() else (0, 0)
    peak = int(max(-low, high))
    run.peaks[name], run.sizes[name] = peak, window_sums.numel()
    run.overflowed[name] = int((window_sums.abs() > limit).sum()) if peak > limit else 0


def _derived(formats: Formats, key: tuple, make) -> object:
    """formats.derived[key], made on first use."""
    if key not in formats.derived:
        formats.derived[key] = make()
    return formats.derived[key]


def _code_digits(formats: Formats, site: str) -> Tensor:
    """The int8 digit planes [D, intervals] of each code in a site's firing table (what synapse_sums reads)."""
    def make():
        code = _derived(formats, ("table", site), lambda: firing_table(formats.sites[site])).code
        return signed_digits(code, digit_count(float(code.abs().max())))
    return _derived(formats, ("code digits", site), make)


def _synapse_gain(formats: Formats, synapse: str, receiver: str | None) -> Tensor:
    """hardware.loihi2.synapse_gain of `synapse` into `receiver` (a site node; None: an op) as a tensor."""
    return _derived(formats, ("gain", synapse, receiver), lambda: torch.from_numpy(synapse_gain(
        formats.synapses[synapse], formats.sites[formats.sources[synapse]],
        None if receiver is None else formats.sites[receiver])))


def _neuron(name: str, source: str, formats: Formats, sums: dict, values: dict, run: FixedRun,
            records: bool, values_read: bool = True, in_place: bool = False) -> tuple[Tensor | None, Tensor]:
    """Integrate, round, saturate and fire one site; keep its record in `run` (with records, its integer codes c as
    float64 in run.window_sums); return (c·δ float64, what an op reads, None when no op reads it (`values_read`); c as
    int8 digit planes, what a synapse reads, synapse_sums). in_place: c·δ may overwrite the input value (only this
    neuron reads it, and it is no other value's view: _FRESH). The fused kernel (neuron.kernel.fire_fixed) runs it in
    one pass where it is available, else integrate_and_fire: the same float64 operations."""
    site = formats.sites[name]
    x, g = (sums[source], _synapse_gain(formats, source, name)) if source in sums else \
        (values[source].double(), float(gain(1.0 / site.unit)))
    table = _derived(formats, ("table", name), lambda: firing_table(site))
    digit_table = _code_digits(formats, name)
    buckets = _derived(formats, ("buckets", name), lambda: kernel.bucket_table(table.low, site.limit))
    fired = None if records else kernel.fire_fixed(x, g, site.limit, table.low, table.code, site.delta,
                                                   code_digits=digit_table, values=values_read, buckets=buckets,
                                                   in_place=in_place)
    if fired:
        value, planes, interval, saturated = fired
    else:
        fired = kernel.fire_fixed(x, g, site.limit, table.low, table.code, site.delta, intervals=True,
                                  buckets=buckets)
        value, code, interval, saturated = fired or integrate_and_fire(x, g, site, table)
        planes = digit_table[:, interval]
        if records:
            run.window_sums[name] = code
    run.saturated[site.site] = run.saturated.get(site.site, 0) + saturated
    run.sizes[name] = x.numel()
    if records:
        interval = interval.reshape(-1)
        run.per_step[name] = torch.bincount(interval, minlength=len(table.low)) @ table.pattern
        u = torch.round(x * g).clamp(-site.limit, site.limit).reshape(-1).long()
        run.counts[name], run.potentials[name] = table.count[interval], u
        run.residuals[name] = (u if table.signed else u.abs()) - table.reset_sum[interval]
    return value, planes


def integrate_and_fire(x: Tensor, g: Tensor | float, site, table: FiringTable) -> tuple[Tensor, Tensor, Tensor, int]:
    """(c·δ, c, interval index, saturations) of u = rint(x·g) saturated to ±limit, in torch."""
    u = torch.round(x * g)
    low, high = torch.aminmax(u) if u.numel() else (0, 0)
    saturated = 0
    if low < -site.limit or high > site.limit:
        saturated = int((u.abs() > site.limit).sum())
        u = u.clamp_(-site.limit, site.limit)
    code, interval = fire(u, table)
    return code * site.delta, code, interval, saturated


# ---- the ops, as the Lava program's numpy OPS compute them (float64, same expressions) --------------------------

# Written with in-place steps on their own new tensors (fewer fresh pages), each step the numpy op's expression.

def _rmsnorm(node: Nonlinear, x: Tensor) -> Tensor:
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + node.eps)
    return y.mul_(node.weight.resolve(_STORE[0]).double()) if node.weight is not None else y


def _softmax(x: Tensor, causal: bool) -> Tensor:
    if causal:
        queries, keys = x.shape[-2:]
        future = torch.arange(keys)[None, :] > torch.arange(queries)[:, None] + (keys - queries)
        x = x.masked_fill(future, float("-inf"))
        e = x.sub_(x.amax(-1, keepdim=True)).exp_()
    else:
        e = torch.exp(x - x.amax(-1, keepdim=True))
    return e.div_(e.sum(-1, keepdim=True))


def _nonlinear(node: Nonlinear, x: Tensor) -> Tensor:
    if node.function == "rmsnorm":
        return _rmsnorm(node, x)
    if node.function == "softmax":
        return _softmax(x, node.causal)
    denominator = torch.neg(x).exp_().add_(1.0)  # 1 + exp(−x)
    return torch.div(x, denominator, out=denominator)


def _repeat_heads(b: Tensor, groups: int) -> Tensor:
    return b.repeat_interleave(groups, dim=-3) if groups > 1 else b


def _activation_matmul(node: ActivationMatmul, a: Tensor, b: Tensor) -> Tensor:
    b = _repeat_heads(b, node.groups)
    return (a @ (b.transpose(-1, -2) if node.transpose_b else b)).mul_(node.scaling)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(node: RoPE, x: Tensor) -> Tensor:
    cos, sin = (table.double() for table in node.tables(x.shape[-2]))
    return x * cos + _rotate_half(x) * sin


def _rotation(node: Rotation, x: Tensor) -> Tensor:
    return rotate_by_factors(x, node.factors())


def _kv_prefix(node: KVPrefix, x: Tensor) -> Tensor:
    cache = node.cache.resolve(_STORE[0]).double()
    return torch.cat((cache.expand(*x.shape[:-3], *cache.shape), x), dim=-2)


def _split_heads(node: SplitHeads, x: Tensor) -> Tensor:
    return x.reshape(*x.shape[:-1], node.heads, node.head_dim).transpose(-3, -2)


def _merge_heads(node: MergeHeads, x: Tensor) -> Tensor:
    x = x.transpose(-3, -2)
    return x.reshape(*x.shape[:-2], node.heads * node.head_dim)


_STORE: list = [None]  # the run's store (arrays read as float64), for the ops that read arrays (set by run_fixed)

_FRESH = (Nonlinear, ActivationMatmul, ElementwiseProduct, ResidualAdd, RoPE)
"""The node types whose OPS below return a new tensor (never their input or a view of it)."""

OPS = {
    Nonlinear: _nonlinear,
    ActivationMatmul: _activation_matmul,
    ElementwiseProduct: lambda node, a, b: a * b,
    RoPE: _rope,
    Rotation: _rotation,
    KVPrefix: _kv_prefix,
    SplitHeads: _split_heads,
    MergeHeads: _merge_heads,
    Embedding: lambda node, ids: node.weight.resolve(_STORE[0])[ids.long()].double(),  # rows, then float64: the same
    ResidualAdd: lambda node, a, b: a + b,
    Output: lambda node, x: x,
}
"""Each non-synaptic IR node type's op in float64 (processes.OPS of the Lava runtime, the same expressions)."""
