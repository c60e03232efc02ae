"""One lowering per IR node type, for both forms: a function that appends the node's ONNX ops to the builder.

decoded  every value is the tensor the IR node's decoded equation gives ([batch, seq, ...]); a phase neuron is an
         elementwise quantizer x ↦ x̂ = σ·Σ_t d(t)·s_t whose T comparisons are unrolled in the graph, op for op as
         neuron.reference.magnitude_spikes runs them (so it is bitwise phase_quantize):
             r_0 = |x|;  s_t = [r_t > θ(t) − v0] ∧ [K = 0 ∨ Σ_{u<t} s_u < K];  r_{t+1} = r_t − h(t)·s_t;
             x̂ = sign(x)·(((d(0)s_0 + d(1)s_1) + …))
         a signed-digit neuron (phase-sd) as neuron.reference.signed_spikes runs it, on the signed potential:
             r_0 = x;  s_t = ([r_t > θ_sd(t)] − [−r_t > θ_sd(t)])·[K = 0 ∨ Σ_{u<t} |s_u| < K];  r_{t+1} = r_t − h(t)·s_t;
             x̂ = ((d(0)s_0 + d(1)s_1) + …)   (no sign: each digit carries its own)
         per-token scales (token_levels L): τ_row = Where(s > 0, s, 1), s = ReduceMax(|x|, last dim) / L; the
         neuron runs on x / τ_row and its output is multiplied by τ_row (in both forms)
event    every float value is a stack [T, batch, seq, ...] of its T per-step tensors (their sum is the decoded
         value), under the event rules of the IR docstrings, as backends.sim.simulate runs them: a linear node maps
         every step (a constant — bias, embedding row, prefix cache, graph input — enters at t = 0 only); a
         nonlinear node emits f(X_t) − f(X_{t−1}) on the running sums X_t (CumSum); an activation product emits
         S_A(t)·S_B(t) − S_A(t−1)·S_B(t−1) (the causal running-sum rule, one product per step); a phase neuron
         integrates its input window (ReduceSum over the steps), unrolls its T phases into the spike planes s_t,
         and emits y_t = σ·d(t)·s_t (signed digits: y_t = d(t)·s_t). Token ids are not stepped. Products and nonlinearities keep the running sums
         they compute (Context.running): their consumers read those (a neuron's window: the last step) rather
         than summing the per-step values again, as backends.sim.simulate does.

Every op follows ir.interpret's order of operations (RMSNorm in float32, RoPE angles and cos/sin in
float32, softmax in float32, key/value heads repeated for grouped queries), so the results differ from the
simulator's only by the runtime's own rounding (summation order in MatMul and ReduceSum, exp, cos, sigmoid).

A lowering is f(ctx, name, node, inputs) -> value: `inputs` maps the node's ports to ONNX value names; it returns
the node's output value, which the exporter renames to the IR node's name (GraphBuilder.name_output).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from onnx import TensorProto

from ...errors import SpikecompileError
from ...ir import (
    ActivationMatmul, ElementwiseProduct, Embedding, Input, IRNode, KVPrefix, Linear, MergeHeads, Nonlinear,
    Output, PhaseNeuron, ResidualAdd, RoPE, Rotation, SplitHeads, TensorType,
)
from ...ir.base import torch_dtype
from ...neuron import step_schedule
from .builder import GraphBuilder, element_type, tensor_proto, value_info

FORMS = ("decoded", "event")
SPIKES_SUFFIX = ".spikes"
"""An event-form export with spike outputs adds, per phase neuron N, the output "N.spikes": bool [T, *shape] (a
signed-digit neuron's: int8 s_t ∈ {−1, 0, +1}, as the simulator keeps them)."""


@dataclasses.dataclass
class Context:
    """What the lowerings share: the builder, each IR value's decoded type (by ONNX value name), the form, and
    whether neurons expose their spike planes."""

    builder: GraphBuilder
    types: dict[str, TensorType]
    event: bool
    spike_outputs: bool = False
    running: dict[str, str] = dataclasses.field(default_factory=dict)
    """event form: the running sums X_t a product or nonlinearity made, by the name of its per-step value"""

    def rank(self, value: str) -> int:
        """The rank of an IR node's ONNX value: its decoded rank, plus the step dim for a float event value."""
        of = self.types[value]
        return len(of.shape) + (self.event and of.is_float)

    def dtype(self, value: str) -> torch.dtype:
        return torch_dtype(self.types[value].dtype)

    def running_sums(self, value: str) -> str:
        """X_t of a stepped value: the sums its producer made, else CumSum over its steps."""
        return self.running.get(value) or running_sum(self.builder, value)

    def window(self, value: str) -> str:
        """Σ_t x_t of a stepped value: its running sums' last step, else ReduceSum over its steps."""
        b = self.builder
        if value in self.running:
            return b.op("Gather", self.running[value], b.constant(-1, torch.int64), axis=0)
        return b.op("ReduceSum", value, b.ints(0), keepdims=0)

    def from_running(self, sums: str, rank: int) -> str:
        """The per-step values out_t = X_t − X_{t−1} of running sums X (kept for the consumers that read sums)."""
        events = step_differences(self.builder, sums, rank)
        self.running[events] = sums
        return events


Lowering = Callable[[Context, str, IRNode, dict[str, str]], str]


# helpers on stepped values (event form)

def at_t0(b: GraphBuilder, x: str, rank: int, steps: int) -> str:
    """[x, 0, …, 0]: `x` (of this rank) as `steps` per-step tensors, whole at t = 0."""
    stacked = b.op("Unsqueeze", x, b.ints(0))
    return b.op("Pad", stacked, b.ints(*[0] * (rank + 1), steps - 1, *[0] * rank)) if steps > 1 else stacked


def running_sum(b: GraphBuilder, x: str) -> str:
    """X_t = x_0 + … + x_t (sequentially, as torch.cumsum)."""
    return b.op("CumSum", x, b.constant(0, torch.int64))


def step_differences(b: GraphBuilder, values: str, rank: int) -> str:
    """f_t − f_{t−1} with f_{−1} := 0, for values f [T, ...] of this rank."""
    previous = b.op("Pad", b.op("Slice", values, b.ints(0), b.ints(-1), b.ints(0)),
                    b.ints(1, *[0] * (rank - 1), *[0] * rank))
    return b.op("Sub", values, previous)


def transpose_last(b: GraphBuilder, x: str, rank: int, first: int) -> str:
    """Swap dims `first` and `first` + 1 (negative: counted from the end) of a tensor of this rank."""
    perm = list(range(rank))
    axis = first % rank
    perm[axis], perm[axis + 1] = perm[axis + 1], perm[axis]
    return b.op("Transpose", x, perm=perm)


# boundaries, linear nodes

def _input(ctx: Context, name: str, node: Input, inputs) -> str:
    of = TensorType(node.shape, node.dtype)
    ctx.builder.input(name, of)
    if ctx.event and of.is_float:
        return at_t0(ctx.builder, name, len(node.shape), node.timesteps or 1)
    return name


def _output(ctx: Context, name: str, node: Output, inputs) -> str:
    b = ctx.builder
    b.outputs.append(value_info(name, ctx.types[inputs["x"]]))
    if ctx.event:
        return ctx.window(inputs["x"])
    return b.op("Identity", inputs["x"])


def _embedding(ctx: Context, name: str, node: Embedding, inputs) -> str:
    b = ctx.builder
    rows = b.op("Gather", b.weight(node.weight), inputs["ids"], axis=0)
    return at_t0(b, rows, len(ctx.types[inputs["ids"]].shape) + 1, node.timesteps) if ctx.event else rows


def _linear(ctx: Context, name: str, node: Linear, inputs) -> str:
    b = ctx.builder
    weight_t = b.op("Transpose", b.weight(node.weight), perm=[1, 0])
    product = b.op("MatMul", inputs["x"], weight_t)
    if node.bias is None:
        return product
    if not ctx.event:
        return b.op("Add", product, b.weight(node.bias))
    bias = node.bias.resolve(b.store)  # b enters at t = 0: a [T, 1, …, 1, out] tensor, zero after its first row
    stepped = bias.new_zeros(node.timesteps, *[1] * (ctx.rank(inputs["x"]) - 2), node.out_features)
    stepped[0] = bias
    return b.op("Add", product, b.tensor(f"{name}.bias_at_t0", stepped))


def _rotation(ctx: Context, name: str, node: Rotation, inputs) -> str:
    """y = x·M on every block of n channels, M = node.matrix() (a dense matmul computes the online
    transform too)."""
    b = ctx.builder
    x, rank = inputs["x"], ctx.rank(inputs["x"])
    width = ctx.types[inputs["x"]].shape[-1]
    matrix = b.tensor(f"{name}.matrix", node.matrix().to(ctx.dtype(inputs["x"])))
    blocks = b.op("Reshape", x, b.ints(*[0] * (rank - 1), width // node.n, node.n))
    rotated = b.op("MatMul", blocks, matrix)
    return b.op("Reshape", rotated, b.ints(*[0] * (rank - 1), width))


def _rope(ctx: Context, name: str, node: RoPE, inputs) -> str:
    """positions p = offset + 0..S−1; angles = p ⊗ [inv_freq, inv_freq] (float32); y = x·cos + rotate_half(x)·sin."""
    b, x = ctx.builder, inputs["x"]
    length = b.op("Squeeze", b.op("Shape", x, start=-2, end=-1), b.ints(0))
    start = b.constant(node.position_offset, torch.int64)
    positions = b.op("Range", start, b.op("Add", length, start), b.constant(1, torch.int64))
    positions = b.op("Unsqueeze", b.op("Cast", positions, to=TensorProto.FLOAT), b.ints(1))
    angles = b.op("Mul", positions, b.tensor(f"{name}.inv_freq", node.frequencies()))
    dtype = ctx.dtype(x)
    cos, sin = (_rope_factor(b, b.op(function, angles), node.attention_scaling, dtype) for function in ("Cos", "Sin"))
    first, second = b.ops("Split", x, b.ints(node.head_dim // 2, node.head_dim // 2), count=2, axis=-1)
    rotated = b.op("Concat", b.op("Neg", second), first, axis=-1)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))


def _rope_factor(b: GraphBuilder, values: str, scaling: float, dtype: torch.dtype) -> str:
    if scaling != 1.0:
        values = b.op("Mul", values, b.constant(scaling, torch.float32))
    return values if dtype == torch.float32 else b.op("Cast", values, to=element_type(dtype))


def _split_heads(ctx: Context, name: str, node: SplitHeads, inputs) -> str:
    """[..., S, heads·head_dim] → reshape [..., S, heads, head_dim] → [..., heads, S, head_dim]."""
    b, x = ctx.builder, inputs["x"]
    rank = ctx.rank(x)
    split = b.op("Reshape", x, b.ints(*[0] * (rank - 1), node.heads, node.head_dim))
    return transpose_last(b, split, rank + 1, -3)


def _merge_heads(ctx: Context, name: str, node: MergeHeads, inputs) -> str:
    b, x = ctx.builder, inputs["x"]
    rank = ctx.rank(x)
    moved = transpose_last(b, x, rank, -3)
    return b.op("Reshape", moved, b.ints(*[0] * (rank - 2), node.heads * node.head_dim))


def _kv_prefix(ctx: Context, name: str, node: KVPrefix, inputs) -> str:
    """concat(cache, x) on the sequence dim; the cache is a graph input (its default: the stored prefix)."""
    b, x = ctx.builder, inputs["x"]
    if node.cache.name not in b.initializers:
        b.input(node.cache.name, TensorType(node.cache.shape, node.cache.dtype))
        b.initializers[node.cache.name] = tensor_proto(node.cache.name, node.cache.resolve(b.store))
    cache = node.cache.name
    batch = b.op("Shape", x, start=int(ctx.event), end=-3)  # the batch dims (not the step dim)
    cache = b.op("Expand", cache, b.op("Concat", batch, b.ints(1, 1, 1), axis=0))
    if ctx.event:
        cache = at_t0(b, cache, ctx.rank(x) - 1, node.timesteps)
    return b.op("Concat", cache, x, axis=-2)


def _residual_add(ctx: Context, name: str, node: ResidualAdd, inputs) -> str:
    return ctx.builder.op("Add", inputs["residual"], inputs["branch"])


# nonlinear nodes: f on the last dim

def _rmsnorm(ctx: Context, node: Nonlinear, x: str, dtype: torch.dtype) -> str:
    """h = x (in float32) · 1/√(mean(x²) + eps), cast back; γ·h."""
    b = ctx.builder
    hidden = _to_float32(b, x, dtype)
    mean = b.op("ReduceMean", b.op("Mul", hidden, hidden), axes=[-1], keepdims=1)
    scale = b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean, b.constant(node.eps, torch.float32))))
    hidden = _from_float32(b, b.op("Mul", hidden, scale), dtype)
    return hidden if node.weight is None else b.op("Mul", b.weight(node.weight), hidden)


def _softmax(ctx: Context, node: Nonlinear, x: str, dtype: torch.dtype) -> str:
    """softmax over keys in float32; causal: key j > i + S_k − S_q masked to −∞ for query i."""
    b = ctx.builder
    if node.causal:
        x = b.op("Where", _future_keys(b, x), b.constant(float("-inf"), dtype), x)
    return _from_float32(b, b.op("Softmax", _to_float32(b, x, dtype), axis=-1), dtype)


def _to_float32(b: GraphBuilder, x: str, dtype: torch.dtype) -> str:
    return x if dtype == torch.float32 else b.op("Cast", x, to=TensorProto.FLOAT)


def _from_float32(b: GraphBuilder, x: str, dtype: torch.dtype) -> str:
    return x if dtype == torch.float32 else b.op("Cast", x, to=element_type(dtype))


def _future_keys(b: GraphBuilder, scores: str) -> str:
    """bool [S_q, S_k]: key j lies in the future of query i, j > i + (S_k − S_q)."""
    queries, keys = b.op("Shape", scores, start=-2, end=-1), b.op("Shape", scores, start=-1)
    zero, one, axis = b.constant(0, torch.int64), b.constant(1, torch.int64), b.ints(0)
    rows = b.op("Range", zero, b.op("Squeeze", queries, axis), one)
    last_visible = b.op("Add", b.op("Unsqueeze", rows, b.ints(1)), b.op("Sub", keys, queries))
    return b.op("Greater", b.op("Range", zero, b.op("Squeeze", keys, axis), one), last_visible)


def _silu(ctx: Context, node: Nonlinear, x: str, dtype: torch.dtype) -> str:
    return ctx.builder.op("Mul", x, ctx.builder.op("Sigmoid", x))


NONLINEAR_FUNCTIONS = {"rmsnorm": _rmsnorm, "softmax": _softmax, "silu": _silu}


def _nonlinear(ctx: Context, name: str, node: Nonlinear, inputs) -> str:
    function, x = NONLINEAR_FUNCTIONS[node.function], inputs["x"]
    if not ctx.event:
        return function(ctx, node, x, ctx.dtype(x))
    return ctx.from_running(function(ctx, node, ctx.running_sums(x), ctx.dtype(x)), ctx.rank(x))


# products of two activations

def _matmul(ctx: Context, node: ActivationMatmul, a: str, b_value: str, of_b: TensorType) -> str:
    """scaling·a·b (b transposed for qk), b's heads repeated `groups` times (head h of a meets h // groups)."""
    b = ctx.builder
    rank = len(of_b.shape) + ctx.event
    if node.groups > 1:  # [..., Hk, S, D] → [..., Hk, groups, S, D] → [..., Hk·groups, S, D]
        kv_heads, head_dim = of_b.shape[-3], of_b.shape[-1]
        repeated = b.op("Expand", b.op("Unsqueeze", b_value, b.ints(rank - 2)), b.ints(node.groups, 1, 1))
        b_value = b.op("Reshape", repeated, b.ints(*[0] * (rank - 3), kv_heads * node.groups, -1, head_dim))
    if node.transpose_b:
        b_value = transpose_last(b, b_value, rank, -2)
    product = b.op("MatMul", a, b_value)
    return b.op("Mul", product, b.constant(node.scaling, torch_dtype(of_b.dtype))) if node.scaling != 1.0 else product


def _activation_matmul(ctx: Context, name: str, node: ActivationMatmul, inputs) -> str:
    a, b_value, of_b = inputs["a"], inputs["b"], ctx.types[inputs["b"]]
    if not ctx.event:
        return _matmul(ctx, node, a, b_value, of_b)
    return _running_product(ctx, lambda x, y: _matmul(ctx, node, x, y, of_b), a, b_value)


def _elementwise_product(ctx: Context, name: str, node: ElementwiseProduct, inputs) -> str:
    a, b_value = inputs["a"], inputs["b"]
    if not ctx.event:
        return ctx.builder.op("Mul", a, b_value)
    return _running_product(ctx, lambda x, y: ctx.builder.op("Mul", x, y), a, b_value)


def _running_product(ctx: Context, product: Callable[[str, str], str], a: str, b_value: str) -> str:
    """out_t = S_A(t)·S_B(t) − S_A(t−1)·S_B(t−1) (= S_A(t)·B_t + A_t·S_B(t) − A_t·B_t; Σ_t out_t = product(ΣA, ΣB)),
    as backends.sim.simulate runs it."""
    return ctx.from_running(product(ctx.running_sums(a), ctx.running_sums(b_value)), ctx.rank(a))


# the phase neuron

def _phase_neuron(ctx: Context, name: str, node: PhaseNeuron, inputs) -> str:
    """decoded: x̂ = sign(x)·Σ_t d(t)·s_t.  event: on the window X = Σ_steps x, y_t = sign(X)·d(t)·s_t stacked
    [T, ...], and on request the spike planes s_t as the bool output "<name>.spikes"."""
    b, x = ctx.builder, inputs["x"]
    dtype = ctx.dtype(x)
    signed = node.signed_digits
    window = ctx.window(x) if ctx.event else x  # integrate-then-fire
    scale = _token_scales(ctx, name, node, window, dtype) if node.token_levels else None
    if scale is not None:
        window = b.op("Div", window, scale)
    spikes = (_signed_spikes(ctx, name, node, window, dtype) if signed
              else _spikes(ctx, name, node, b.op("Abs", window), dtype))
    weights, _, _ = (values.to(dtype) for values in step_schedule(node.params()))
    if not ctx.event:  # Σ_t d(t)·s_t accumulated in step order, as neuron.reference.weighted_spike_sum
        total = b.op("Mul", spikes[0], b.tensor(f"{name}.d.0", weights[0]))
        for t in range(1, node.timesteps):
            total = b.op("Add", total, b.op("Mul", spikes[t], b.tensor(f"{name}.d.{t}", weights[t])))
        value = total if signed else b.op("Mul", b.op("Sign", window), total)
        return value if scale is None else b.op("Mul", value, scale)
    planes = b.op("Concat", *(b.op("Unsqueeze", spike, b.ints(0)) for spike in spikes), axis=0)
    if ctx.spike_outputs:
        kind = "int8" if signed else "bool"
        b.op("Cast", planes, to=element_type(kind), output=name + SPIKES_SUFFIX)
        b.outputs.append(value_info(name + SPIKES_SUFFIX, TensorType(ctx.types[x].shape, kind), (node.timesteps,)))
    per_step = b.tensor(f"{name}.d", weights.view(-1, *[1] * (ctx.rank(x) - 1)))
    events = (b.op("Mul", per_step, planes) if signed
              else b.op("Mul", b.op("Mul", b.op("Sign", window), per_step), planes))
    return events if scale is None else b.op("Mul", events, scale)


def _token_scales(ctx: Context, name: str, node: PhaseNeuron, x: str, dtype: torch.dtype) -> str:
    """τ_row = max|x_row| / L over the last dim, kept as [..., 1], and 1 where it is 0 (neuron.token_scales, op for
    op: the divide and the choice are exact, so the runtime gives the same bits)."""
    b = ctx.builder
    peak = b.op("ReduceMax", b.op("Abs", x), axes=[-1], keepdims=1)  # opset 17: axes is an attribute
    scale = b.op("Div", peak, b.tensor(f"{name}.token_levels", torch.tensor(float(node.token_levels), dtype=dtype)))
    zero, one = (b.tensor(f"{name}.token_scale.{value}", torch.tensor(float(value), dtype=dtype)) for value in (0, 1))
    return b.op("Where", b.op("Greater", scale, zero), scale, one)


def _spikes(ctx: Context, name: str, node: PhaseNeuron, magnitude: str, dtype: torch.dtype) -> list[str]:
    """s_0..s_{T−1} (0./1. in dtype) of neuron.reference.magnitude_spikes: r_0 = |x|, s_t = [r_t > θ(t) − v0],
    r_{t+1} = r_t − h(t)·s_t; the step values are computed by step_schedule, not re-derived. With a spike budget
    1 ≤ K < T the steps t ≥ K (where the count can reach K) fire only while k_t = Σ_{u<t} s_u < K:
    s_t = And([r_t > θ(t) − v0], [k_t < K]), k_t summed in dtype (small integers, exact); K = 0 or K ≥ T
    never binds and adds no op."""
    b = ctx.builder
    params = node.params()
    _, resets, _ = step_schedule(params)
    thresholds = params.thresholds().to(dtype)
    budget = node.max_spikes if 0 < node.max_spikes < node.timesteps else 0
    spikes, residual, count = [], magnitude, None
    for t in range(node.timesteps):
        fired = b.op("Greater", residual, b.tensor(f"{name}.threshold.{t}", thresholds[t]))
        if budget and t >= budget:
            fired = b.op("And", fired, b.op("Less", count, b.tensor(f"{name}.max_spikes", torch.tensor(
                float(budget), dtype=dtype))))
        spikes.append(b.op("Cast", fired, to=element_type(dtype)))
        if budget and t + 1 < node.timesteps:
            count = spikes[t] if count is None else b.op("Add", count, spikes[t])
        if t + 1 < node.timesteps:
            reset = b.op("Mul", spikes[t], b.tensor(f"{name}.h.{t}", resets[t].to(dtype)))
            residual = b.op("Sub", residual, reset)
    return spikes


def _signed_spikes(ctx: Context, name: str, node: PhaseNeuron, x: str, dtype: torch.dtype) -> list[str]:
    """s_0..s_{T−1} (−1./0./1. in dtype) of neuron.reference.signed_spikes: r_0 = x, s_t = [r_t > θ_sd(t)] −
    [−r_t > θ_sd(t)], r_{t+1} = r_t − h(t)·s_t (h(t)·s_t exact: one rounding, as addcmul). With a spike budget
    1 ≤ K < T the steps t ≥ K are masked by [k_t < K], k_t = Σ_{u<t} |s_u| (small integers, exact)."""
    b = ctx.builder
    params = node.params()
    _, resets, _ = step_schedule(params)
    thresholds = params.signed_thresholds().to(dtype)
    budget = node.max_spikes if 0 < node.max_spikes < node.timesteps else 0
    spikes, residual, count = [], x, None
    for t in range(node.timesteps):
        threshold = b.tensor(f"{name}.threshold.{t}", thresholds[t])
        up = b.op("Cast", b.op("Greater", residual, threshold), to=element_type(dtype))
        down = b.op("Cast", b.op("Greater", b.op("Neg", residual), threshold), to=element_type(dtype))
        digit = b.op("Sub", up, down)
        if budget and t >= budget:
            open_ = b.op("Less", count, b.tensor(f"{name}.max_spikes", torch.tensor(float(budget), dtype=dtype)))
            digit = b.op("Mul", digit, b.op("Cast", open_, to=element_type(dtype)))
        spikes.append(digit)
        if budget and t + 1 < node.timesteps:
            count = b.op("Abs", digit) if count is None else b.op("Add", count, b.op("Abs", digit))
        if t + 1 < node.timesteps:
            residual = b.op("Sub", residual, b.op("Mul", digit, b.tensor(f"{name}.h.{t}", resets[t].to(dtype))))
    return spikes


LOWERINGS: dict[type[IRNode], Lowering] = {
    Input: _input,
    Output: _output,
    Embedding: _embedding,
    Linear: _linear,
    Rotation: _rotation,
    RoPE: _rope,
    SplitHeads: _split_heads,
    MergeHeads: _merge_heads,
    KVPrefix: _kv_prefix,
    ResidualAdd: _residual_add,
    Nonlinear: _nonlinear,
    ActivationMatmul: _activation_matmul,
    ElementwiseProduct: _elementwise_product,
    PhaseNeuron: _phase_neuron,
}
"""One lowering per node type for both forms: each branches on ctx.event where its event rule differs; the per-step
nodes (Rotation, RoPE, SplitHeads, MergeHeads, ResidualAdd) are written for any number of leading dims and serve
both forms as they are."""


def lowering(name: str, node: IRNode) -> Lowering:
    """The lowering of `node`; SpikecompileError naming the node and its type if there is none."""
    found = LOWERINGS.get(type(node))
    if found is None:
        raise SpikecompileError(f"node {name}: the onnx backend has no lowering for {type(node).__name__} "
                                f"(it lowers {', '.join(sorted(t.__name__ for t in LOWERINGS))})")
    return found
