"""IR nodes → stock NIR nodes: one lowering per IR node type NIR expresses exactly (LOWERINGS), and for every other
type the reason it cannot (NOT_EXPRESSIBLE).

NIR maps one real vector per step; here a vector is the last dim (width n) of an IR tensor, the leading dims
(batch, sequence, heads) are independent samples. Several edges into one node are summed before the node acts
(the convention of NIR, nirtorch and norse). Every summing node below has exactly two inputs, so the sum does
not depend on the consumer's order and the encoding is exact in float32, bit for bit.

Phase neuron (docs/method.md §1), the IR node `N` of width n, T steps, t = 0..T−1, unrolled into depth: one consumer
step computes all T phases. With c_t = θ(t) − v0 (thresholds on r = v − v0, as neuron.reference computes them)
and the spike budget K (N.max_spikes; 0: none):

    N.neg.x     = Scale(−1)(x)                                   −x
    N.pos.is    = Threshold(0)(x),  N.neg.is = Threshold(0)(N.neg.x)   [x > 0], [x < 0]
    N.pos.gate  = Scale(−v0)(N.neg.is),  N.neg.gate = Scale(−v0)(N.pos.is)
    per channel ch ∈ {pos, neg} with input ±x and sign ±1:
      N.ch.r0       = Scale(1)(±x + N.ch.gate)                  r_0 = |x| when the sign is ch's
      N.ch.spike{t} = Threshold(c_t)(N.ch.r{t})                 s_t = [r_t > c_t]   (no budget: K = 0, K ≥ T, or t < K)
      N.ch.reset{t} = Scale(−h(t))(N.ch.spike{t})               (t < T−1)
      N.ch.r{t+1}   = Scale(1)(N.ch.r{t} + N.ch.reset{t})       r_{t+1} = r_t − h(t)·s_t
      N.ch.out{t}   = Scale(±d(t))(N.ch.spike{t})
      N.ch.sum{t}   = Scale(1)(N.ch.sum{t−1} + N.ch.out{t})     (N.ch.sum0 is N.ch.out0: Σ in step order)
    N           = Scale(1)(N.pos.sum{T−1} + N.neg.sum{T−1})      x̂ = σ·Σ_t d(t)·s_t

The gate keeps the other sign's channel silent, for v0 of either sign and any size: a negative x enters the pos
channel as r_0 = fl(x − v0) ≤ −v0 (rounding is monotone and −v0 is a float), and every c_t = fl(θ(t) − v0) ≥
fl(0 − v0) = −v0 (θ(t) > 0), so [r_0 > c_t] is 0 at every step, no reset moves r, and the channel never fires
(nor spends budget). At x = 0 both channels see r_0 = 0 and fire alike (some c_t < 0 when v0 > θ(t)), and
their outputs cancel (σ = 0). The signed spike train is σ·s_t = N.pos.spike{t} − N.neg.spike{t}. Without a
budget that is 10T + 2 nodes of width n per neuron. The scalars are the same for every element: each NIR array
holds n copies.

Spike budget, 1 ≤ K < T (K ≥ T never binds: k_t = Σ_{u<t} s_u ≤ t < K): the steps t ≥ K, where the count of
earlier spikes k_t can reach K, fire only while k_t < K; in small integers, all exact:

      N.ch.count{t}  = Scale(1)(N.ch.count{t−1} + N.ch.spike{t−1})     k_t  (t ≥ 2; k_1 is N.ch.spike0)
      N.ch.fire{t}   = Threshold(c_t)(N.ch.r{t})                       [r_t > c_t]
      N.ch.scaled{t} = Scale(K)(N.ch.fire{t})                          K·[r_t > c_t]
      N.ch.spent{t}  = Scale(−1)(N.ch.count{t})                        −k_t
      N.ch.spike{t}  = Threshold(½)(N.ch.scaled{t} + N.ch.spent{t})    s_t = [K·[r_t > c_t] − k_t > ½]

K − k_t > ½ ⟺ k_t ≤ K − 1, and −k_t > ½ never, so s_t = [r_t > c_t] ∧ [k_t < K], neuron.reference's budget
(k_t ≤ K always: spikes stop at K). That adds 2·((T − 2) + 3·(T − K)) nodes: 18T − 6K − 2 in all.

Signed-digit neuron (N.signed_digits, the phase-sd coding): one potential r that keeps its sign, r_0 = x, and the
thresholds c_t = θ_sd(t) = (2·θ(t) + (−1)^(T−t)·v0)/3 (PhaseNeuronParams.signed_thresholds); its two Threshold
channels fire on r and on −r:

    N.r0          = Scale(1)(x)
    N.pos.spike{t} = Threshold(c_t)(N.r{t})                       [r_t > c_t]
    N.neg.r{t}     = Scale(−1)(N.r{t});  N.neg.spike{t} = Threshold(c_t)(N.neg.r{t})    [−r_t > c_t]
    N.neg.minus{t} = Scale(−1)(N.neg.spike{t})
    N.s{t}         = Scale(1)(N.pos.spike{t} + N.neg.minus{t})     s_t ∈ {−1, 0, +1}
    N.reset{t}     = Scale(−h(t))(N.s{t});  N.r{t+1} = Scale(1)(N.r{t} + N.reset{t})    (t < T−1)
    N.out{t}       = Scale(d(t))(N.s{t});   N.sum{t} = Scale(1)(N.sum{t−1} + N.out{t})  (N.sum0 is N.out0)
    N              = Scale(1)(N.sum{T−1})                           x̂ = Σ_t d(t)·s_t

−h(t)·s_t and d(t)·s_t are exact, so each r_{t+1} and sum is one rounding, as in neuron.reference; the signed
train is N.pos.spike{t} − N.neg.spike{t} = s_t, as for the unsigned neuron: 9T − 1 nodes. A binding spike budget
on a signed-digit neuron (no coding makes one) is not lowered: the node runs from its record.

Synapse: IR Linear → Affine(W, b), or Linear(W) without bias. Residual add: Scale(1) fed by both inputs.
The d(t) weights stay in the Scale nodes: folding them into the next synapse would store its weights T times.

The approximate variant, for consumers without Threshold/Scale, uses IF(r = 1, v_threshold = c, v_reset = 0) for
Threshold(c) and Linear(diag(s)) for Scale(s) (n² weights each). An IF equals the Threshold only for a consumer
that integrates one step v = 0 + I from rest (dt·R = 1, as norse does) and resets its state between inputs.

Every NIR node carries metadata {"spikecompile.node": N}; the node named N (the one carrying N's value) also
{"spikecompile.op": IR type, "spikecompile.ir": N's record as JSON (records.describe)}.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import nir
import numpy as np

from ...ir import (
    ActivationMatmul,
    ElementwiseProduct,
    Embedding,
    IRNode,
    KVPrefix,
    Linear,
    MergeHeads,
    Nonlinear,
    PhaseNeuron,
    ResidualAdd,
    RoPE,
    Rotation,
    SplitHeads,
    TensorStore,
    TensorType,
)
from ...neuron import step_schedule
from .records import describe


class NotExpressible(Exception):
    """This node (not its type) has no exact NIR form; the message says why."""


@dataclasses.dataclass(frozen=True)
class Port:
    """An IR input port of the node being lowered, as a source of NIR edges."""

    name: str


@dataclasses.dataclass
class Lowered:
    """The NIR nodes IR node `name` becomes (named `name` or `name.<part>`), their edges, the nodes each IR input
    port feeds (entries), and the node named `name` that carries the IR node's value."""

    name: str
    nodes: dict[str, nir.NIRNode] = dataclasses.field(default_factory=dict)
    edges: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    entries: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, part: str | None, node: nir.NIRNode, *sources: str | Port) -> str:
        """Add `node` as `name.part` (`name` itself when part is None), fed by NIR nodes or IR ports."""
        name = self.name if part is None else f"{self.name}.{part}"
        node.metadata = {"spikecompile.node": self.name}
        self.nodes[name] = node
        for source in sources:
            if isinstance(source, Port):
                self.entries.setdefault(source.name, []).append(name)
            else:
                self.edges.append((source, name))
        return name


@dataclasses.dataclass(frozen=True)
class Variant:
    """How a threshold and a per-element scale are written: stock Threshold/Scale (exact), or IF/Linear."""

    name: str
    threshold: Callable[[float, int], nir.NIRNode]
    scale: Callable[[float, int], nir.NIRNode]
    approximates: str | None = None  # why this variant's neurons are approximate, or None when exact


def _full(value: float, width: int) -> np.ndarray:
    return np.full(width, value, dtype=np.float32)


VARIANTS = {
    "exact": Variant("exact", lambda value, width: nir.Threshold(threshold=_full(value, width)),
                     lambda value, width: nir.Scale(scale=_full(value, width))),
    "approximate": Variant(
        "approximate",
        lambda value, width: nir.IF(r=_full(1.0, width), v_threshold=_full(value, width), v_reset=_full(0.0, width)),
        lambda value, width: nir.Linear(weight=np.diag(_full(value, width))),
        approximates="IF neurons stand in for Threshold: equal only for a consumer that integrates one step "
                     "v = 0 + I from rest (dt·R = 1) and resets state between inputs",
    ),
}

X = Port("x")


def lower_phase_neuron(name: str, node: PhaseNeuron, width: int, variant: Variant, store: TensorStore) -> Lowered:
    """The phase neuron unrolled over its T steps into two sign channels (the module docstring): 10T + 2 nodes,
    18T − 6K − 2 with a spike budget 1 ≤ K < T; a signed-digit neuron 9T − 1 on one signed potential. A neuron
    with per-token scales is not expressible: NIR has no reduction over a vector for the row's max."""
    if node.token_levels:
        raise NotExpressible("per-token scales (--sdllm-scales per-token): τ_row = max|x_row| / L is a run-time "
                             "reduction over the row, which no NIR primitive computes")
    params = node.params()
    if params.signed_digits:
        return _lower_signed_digits(name, params, width, variant)
    d, h, _ = step_schedule(params)
    thresholds, output_weights, resets = params.thresholds().tolist(), d.tolist(), h.tolist()
    budget = node.max_spikes if 0 < node.max_spikes < params.T else 0  # K ≥ T never binds
    lowered = Lowered(name)
    negated = lowered.add("neg.x", variant.scale(-1.0, width), X)
    sources = {"pos": X, "neg": negated}
    for channel, source in sources.items():
        lowered.add(f"{channel}.is", variant.threshold(0.0, width), source)
    totals = []
    for channel, other, sign in (("pos", "neg", 1.0), ("neg", "pos", -1.0)):
        gate = lowered.add(f"{channel}.gate", variant.scale(-params.v0.item(), width), f"{name}.{other}.is")
        potential = lowered.add(f"{channel}.r0", variant.scale(1.0, width), sources[channel], gate)
        total = count = None
        for t in range(params.T):
            if budget and t >= budget:  # s_t = [K·[r_t > c_t] − c_t > ½]
                fire = lowered.add(f"{channel}.fire{t}", variant.threshold(thresholds[t], width), potential)
                scaled = lowered.add(f"{channel}.scaled{t}", variant.scale(float(budget), width), fire)
                spent = lowered.add(f"{channel}.spent{t}", variant.scale(-1.0, width), count)
                spike = lowered.add(f"{channel}.spike{t}", variant.threshold(0.5, width), scaled, spent)
            else:
                spike = lowered.add(f"{channel}.spike{t}", variant.threshold(thresholds[t], width), potential)
            if budget and t + 1 < params.T:  # c_{t+1} = c_t + s_t
                count = spike if count is None else lowered.add(f"{channel}.count{t + 1}",
                                                               variant.scale(1.0, width), count, spike)
            out = lowered.add(f"{channel}.out{t}", variant.scale(sign * output_weights[t], width), spike)
            total = out if total is None else lowered.add(f"{channel}.sum{t}", variant.scale(1.0, width), total, out)
            if t + 1 < params.T:
                drop = lowered.add(f"{channel}.reset{t}", variant.scale(-resets[t], width), spike)
                potential = lowered.add(f"{channel}.r{t + 1}", variant.scale(1.0, width), potential, drop)
        totals.append(total)
    lowered.add(None, variant.scale(1.0, width), *totals)
    return lowered


def _lower_signed_digits(name: str, params, width: int, variant: Variant) -> Lowered:
    """The signed-digit neuron unrolled over its T steps on one signed potential (the module docstring): 9T − 1
    nodes."""
    if 0 < int(params.max_spikes) < params.T:
        raise NotExpressible(f"a signed-digit neuron with a spike budget K = {int(params.max_spikes)} < T: the "
                             f"budget's count of nonzero digits is not lowered")
    d, h, _ = step_schedule(params)
    thresholds, output_weights, resets = params.signed_thresholds().tolist(), d.tolist(), h.tolist()
    lowered = Lowered(name)
    potential = lowered.add("r0", variant.scale(1.0, width), X)
    total = None
    for t in range(params.T):
        up = lowered.add(f"pos.spike{t}", variant.threshold(thresholds[t], width), potential)
        negated = lowered.add(f"neg.r{t}", variant.scale(-1.0, width), potential)
        down = lowered.add(f"neg.spike{t}", variant.threshold(thresholds[t], width), negated)
        minus = lowered.add(f"neg.minus{t}", variant.scale(-1.0, width), down)
        digit = lowered.add(f"s{t}", variant.scale(1.0, width), up, minus)
        out = lowered.add(f"out{t}", variant.scale(output_weights[t], width), digit)
        total = out if total is None else lowered.add(f"sum{t}", variant.scale(1.0, width), total, out)
        if t + 1 < params.T:
            drop = lowered.add(f"reset{t}", variant.scale(-resets[t], width), digit)
            potential = lowered.add(f"r{t + 1}", variant.scale(1.0, width), potential, drop)
    lowered.add(None, variant.scale(1.0, width), total)
    return lowered


def lower_linear(name: str, node: Linear, width: int, variant: Variant, store: TensorStore) -> Lowered:
    """y = W·x + b as NIR Affine(W, b), or y = W·x as NIR Linear(W) when the node has no bias."""
    weight = node.weight.resolve(store).detach().cpu().numpy()
    synapse = (nir.Linear(weight=weight) if node.bias is None
               else nir.Affine(weight=weight, bias=node.bias.resolve(store).detach().cpu().numpy()))
    lowered = Lowered(name)
    lowered.add(None, synapse, X)
    return lowered


def lower_residual_add(name: str, node: ResidualAdd, width: int, variant: Variant, store: TensorStore) -> Lowered:
    """y = residual + branch: both edges summed into one Scale(1)."""
    lowered = Lowered(name)
    lowered.add(None, variant.scale(1.0, width), Port("residual"), Port("branch"))
    return lowered


Lowering = Callable[[str, IRNode, int, Variant, TensorStore], Lowered]
LOWERINGS: dict[type[IRNode], Lowering] = {
    PhaseNeuron: lower_phase_neuron,
    Linear: lower_linear,
    ResidualAdd: lower_residual_add,
}

_HEADS = "reorders the sequence and head axes: NIR maps one vector per step and has no reshape or transpose"
_PRODUCT = "multiplies two activations: NIR synapses multiply by fixed weights only"
NOT_EXPRESSIBLE: dict[type[IRNode], str] = {
    Embedding: "looks rows up by integer token ids: NIR carries real vectors and has no gather",
    RoPE: "rotates each token by its position: a NIR node applies the same map at every position",
    SplitHeads: _HEADS,
    MergeHeads: _HEADS,
    KVPrefix: "prepends a constant cache along the sequence axis: NIR has no sequence axis",
    Nonlinear: "rmsnorm, softmax and silu: NIR has no such nonlinearity",
    ActivationMatmul: _PRODUCT,
    ElementwiseProduct: _PRODUCT,
    Rotation: "a Hadamard transform run as a fast transform: NIR has no such node (a dense Linear would store "
              "n² weights per block)",
}
"""Why NIR cannot express each of these node types: the manifest's rule for them (they run from their records)."""


def vector_width(value: TensorType) -> int:
    """The NIR vector width of an IR value: its last dim, which must be a fixed size, in float32."""
    if not value.shape or not isinstance(value.shape[-1], int) or value.dtype != "float32":
        raise NotExpressible(f"its value {value} is not a float32 tensor with a fixed last dim (NIR vectors have "
                             f"a fixed size)")
    return value.shape[-1]


def lower(name: str, node: IRNode, value: TensorType, variant: Variant, store: TensorStore) -> Lowered:
    """The NIR form of IR node `name` whose output is `value`; NotExpressible if this node has none."""
    lowered = LOWERINGS[type(node)](name, node, vector_width(value), variant, store)
    lowered.nodes[name].metadata.update({"spikecompile.op": type(node).__name__,
                                         "spikecompile.ir": json.dumps(describe(name, node))})
    return lowered
