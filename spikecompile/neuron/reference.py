"""The phase neuron of one spike site: distribution-aware multi-granularity phase coding (docs/method.md §1).

A site's neuron codes a real x as a sign and T binary spikes. Step t (t = 0..T-1) belongs to grain g(t)
and uses that grain's output, reset and threshold bases, with the GLOBAL step index as exponent:

    d(t) = τ·d[g(t)]^-(t+1)     h(t) = τ·h[g(t)]^-(t+1)     θ(t) = τ·θ[g(t)]^-(t+1)

    σ = sign(x);   v = |x| + v0,  v0 = ½·τ·2^-T by default
    for t = 0..T-1:   s_t = [v > θ(t)] ∧ [Σ_{u<t} s_u < K]   (strict);   v ← v − h(t)·s_t
    x̂ = σ·Σ_t d(t)·s_t

K = max_spikes is the spike budget (K = 0: none, the phase neuron). With every base 2 and no budget this is
exactly a (T+1)-bit sign-magnitude round-to-nearest quantizer with step Δ = τ·2^-T saturating at
(2^T − 1)·Δ (``golden_base2``). The other codings (conversion.codings) are this neuron with other
parameters: a budget (spikedattn K = 2, ttfs K = 1), bases 1 with v0 = ½τ (rate: T + 1 uniform levels).

Signed digits (signed_digits=True, the `phase-sd` coding): the potential keeps its sign and each step emits
s_t ∈ {−1, 0, +1}, so a later step can correct an earlier one (non-adjacent form, SDLLM's bidirectional code):

    r = x;   θ_sd(t) = (2·θ(t) + (−1)^(T−t)·v0)/3
    for t = 0..T-1:   s_t = sign(r)·[|r| > θ_sd(t)] ∧ [Σ_{u<t} |s_u| < K]   (strict);   r ← r − h(t)·s_t
    x̂ = Σ_t d(t)·s_t

With every base 2 and the default v0, θ_sd(t) = (M_t + ½)·Δ with M_t = ⌊2^(T−t)/3⌋, the most the later steps
reach in non-adjacent form: x̂ is the nearest level (the same 2^(T+1) − 1 levels, ties to either neighbour)
coded with the fewest nonzero digits (``golden_signed_base2``).

Parameters broadcast over x by batch prefix: a neuron with batch shape B applies to x of shape (*B, *rest),
one site per index of B; B = () is one site for every element.
"""

from collections.abc import Callable, Iterable, Iterator
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

# fire(r, θ(t) − v0, t) -> s_t as 0./1. in r's dtype.
Fire = Callable[[Tensor, Tensor, int], Tensor]


@dataclass(frozen=True)
class PhaseNeuronParams:
    """The parameters of a batch of phase neurons (equations in the module docstring).

    tau:      [*B]     scale τ > 0
    genotype: [*B, T]  int64 grain index g(t): starts at 0, steps up by 0 or 1, ends at n − 1
                       (each grain owns one contiguous block of steps)
    d, h, theta: [*B, n]  output, reset and threshold bases (> 0; 2 is plain binary coding)
    v0:       [*B]     initial potential like tau (None: ½·τ·2^-T, half an LSB of the base-2 code; may be
                       negative: a lower start widens the zero bin, SDLLM's membrane clipping)
    max_spikes: [*B]   int64 spike budget K ≥ 0 (None: zeros, no budget)
    signed_digits: the signed-digit neuron (module docstring, "Signed digits"): s_t ∈ {−1, 0, +1}, the
                   potential keeps its sign, K counts nonzero steps. False (default): the neuron above.
    """

    tau: Tensor
    genotype: Tensor
    d: Tensor
    h: Tensor
    theta: Tensor
    v0: Tensor | None = None
    max_spikes: Tensor | None = None
    signed_digits: bool = False

    def __post_init__(self):
        if not isinstance(self.signed_digits, bool):
            raise ValueError(f"PhaseNeuronParams: signed_digits must be a bool, got {self.signed_digits!r}")
        batch = tuple(self.tau.shape)
        if not self.tau.is_floating_point():
            raise ValueError(f"PhaseNeuronParams: tau must be a float tensor, got {self.tau.dtype}")
        if self.v0 is None:  # dataclasses.replace(params, tau=...) must pass v0=None to re-derive it
            object.__setattr__(self, "v0", initial_potential(self.tau, self.genotype.shape[-1]))
        if self.max_spikes is None:
            object.__setattr__(self, "max_spikes", torch.zeros(batch, dtype=torch.int64, device=self.tau.device))
        if self.v0.shape != self.tau.shape or self.v0.dtype != self.tau.dtype or not bool(torch.isfinite(self.v0).all()):
            raise ValueError(f"PhaseNeuronParams: v0 must be finite {self.tau.dtype} of shape {batch} like tau, "
                             f"got {self.v0.dtype} {tuple(self.v0.shape)}")
        if (self.max_spikes.shape != self.tau.shape or self.max_spikes.dtype != torch.int64
                or not bool((self.max_spikes >= 0).all())):
            raise ValueError(f"PhaseNeuronParams: max_spikes must be int64 ≥ 0 of shape {batch} like tau, "
                             f"got {self.max_spikes.dtype} {tuple(self.max_spikes.shape)}")
        if self.genotype.dtype != torch.int64 or self.genotype.ndim != len(batch) + 1:
            raise ValueError(f"PhaseNeuronParams: genotype must be int64 of shape [*B, T] with B = tau.shape = "
                             f"{batch}, got {self.genotype.dtype} {tuple(self.genotype.shape)}")
        if self.genotype.shape[:-1] != self.tau.shape or self.genotype.shape[-1] < 1:
            raise ValueError(f"PhaseNeuronParams: genotype shape {tuple(self.genotype.shape)} must be "
                             f"[*B, T] with B = tau.shape = {batch} and T ≥ 1")
        n = self.d.shape[-1] if self.d.ndim else 0
        for name in ("d", "h", "theta"):
            base = getattr(self, name)
            if base.shape != (*batch, n) or n < 1 or base.dtype != self.tau.dtype:
                raise ValueError(f"PhaseNeuronParams: {name} must be {self.tau.dtype} of shape [*B, n] = "
                                 f"{(*batch, n)} like d, got {base.dtype} {tuple(base.shape)}")
            if not bool(torch.isfinite(base).all() and (base > 0).all()):
                raise ValueError(f"PhaseNeuronParams: {name} bases must be finite and > 0")
        if not bool(torch.isfinite(self.tau).all() and (self.tau > 0).all()):
            raise ValueError("PhaseNeuronParams: tau must be finite and > 0 (an all-zero site still needs τ > 0)")
        steps_up = self.genotype.diff(dim=-1)
        if not bool((self.genotype[..., 0] == 0).all() and (self.genotype[..., -1] == n - 1).all()
                    and ((steps_up == 0) | (steps_up == 1)).all()):
            raise ValueError(f"PhaseNeuronParams: genotype must start at 0, rise by 0 or 1 per step and end at "
                             f"n − 1 = {n - 1} (one contiguous block per grain), e.g. even_genotype(T, n)")

    def derived(self, **changes) -> "PhaseNeuronParams":
        """This neuron with `changes`, unchecked: for a neuron derived from a checked one in a hot loop, whose
        changes keep it valid by construction (its rows; bases 1 + e^p > 0). Fitting makes one per step and chunk;
        __post_init__'s checks (a dozen reductions, each a Python round trip, under the GIL that the two fitting
        threads share) made SmolLM2's fitting 28.6–30.8 s against 23.6–25.2 s without them (alternating runs).
        v0 and max_spikes are kept or given, never derived again."""
        neuron = object.__new__(PhaseNeuronParams)
        for field in dataclasses.fields(self):
            object.__setattr__(neuron, field.name, changes.pop(field.name, getattr(self, field.name)))
        if changes:
            raise TypeError(f"PhaseNeuronParams.derived: no fields {sorted(changes)}")
        return neuron

    @property
    def T(self) -> int:
        return self.genotype.shape[-1]

    @property
    def n_grains(self) -> int:
        return self.d.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.tau.shape

    @property
    def has_budget(self) -> bool:
        return bool((self.max_spikes > 0).any())

    def thresholds(self) -> Tensor:
        """[*B, T] θ(t) − v0: the thresholds against the residual r = v − v0 (see magnitude_spikes)."""
        return step_schedule(self)[2] - self.v0.unsqueeze(-1)

    def signed_thresholds(self) -> Tensor:
        """[*B, T] θ_sd(t) = (2·θ(t) + (−1)^(T−t)·v0)/3: the signed-digit neuron's thresholds against |r|.

        Two thirds of θ(t) is where a non-adjacent-form code must take a digit (the steps after t reach at
        most ⅔ of h(t)); the ±v0/3 puts the boundary exactly halfway between levels with every base 2:
        θ_sd(t) = (M + ½)·Δ, M = ⌊2^(T−t)/3⌋ (exact in float: 2θ(t) ± v0 is then a multiple of 3).
        """
        theta = step_schedule(self)[2]
        steps_left = torch.arange(self.T, 0, -1, device=theta.device)
        alternating = torch.where(steps_left % 2 == 0, 1.0, -1.0).to(theta.dtype)
        return (2 * theta + alternating * self.v0.unsqueeze(-1)) / 3


def even_genotype(T: int, n: int) -> Tensor:
    """Split T steps into n contiguous blocks as evenly as possible; earlier blocks get the extra step."""
    if not 1 <= n <= T:
        raise ValueError(f"even_genotype: need 1 ≤ n ≤ T, got T={T}, n={n}")
    sizes = [T // n + (grain < T % n) for grain in range(n)]
    return torch.repeat_interleave(torch.arange(n), torch.tensor(sizes))


def base2_params(tau, T: int, n: int = 1, genotype: Tensor | None = None) -> PhaseNeuronParams:
    """The neuron with every base 2 (the LAS neuron, a uniform quantizer); tau is a float or a [*B] tensor."""
    tau = torch.as_tensor(tau, dtype=torch.float32)
    genotype = even_genotype(T, n) if genotype is None else genotype
    genotype = genotype.to(device=tau.device).expand(*tau.shape, T).contiguous()
    twos = torch.full((*tau.shape, n), 2.0, dtype=tau.dtype, device=tau.device)
    return PhaseNeuronParams(tau=tau, genotype=genotype, d=twos, h=twos.clone(), theta=twos.clone())


def step_schedule(params: PhaseNeuronParams) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step (d(t), h(t), θ(t)), each [*B, T]: τ·base[g(t)]^-(t+1). Differentiable in the bases."""
    exponent = -torch.arange(1, params.T + 1, dtype=params.tau.dtype, device=params.tau.device)
    tau = params.tau.unsqueeze(-1)
    return tuple(tau * torch.pow(base.gather(-1, params.genotype), exponent)
                 for base in (params.d, params.h, params.theta))


def initial_potential(tau, T: int) -> Tensor:
    """v0 = ½·τ·2^-T: half an LSB of the base-2 code, fixed (not learned)."""
    return torch.as_tensor(tau) * 2.0 ** -(T + 1)


def fire_heaviside(residual: Tensor, threshold: Tensor, step: int) -> Tensor:
    """s_t = [residual > threshold] as 0./1. in residual's dtype (the neuron's spike function)."""
    return (residual > threshold).to(residual.dtype)


def magnitude_spikes(magnitude: Tensor, params: PhaseNeuronParams, fire: Fire = fire_heaviside) -> Iterator[Tensor]:
    """Yield s_0..s_{T-1} (0./1. like magnitude) for |x| = magnitude of shape (*B, *rest).

    The potential is tracked as r = v − v0 against thresholds θ(t) − v0: the same neuron, but |x| is
    never rounded by the float addition |x| + v0, which could otherwise push a value across a threshold
    (this keeps base 2 bit-exact with ``golden_base2``). ``fire(r, θ(t) − v0, t)`` returns s_t; the fit
    passes one with a surrogate gradient and the same forward value.
    A budget K > 0 stops firing after K spikes: s_t is masked by [spikes so far < K] (0 for such elements).
    """
    return _spike_train(magnitude, params, params.thresholds(), fire)


def signed_spikes(x: Tensor, params: PhaseNeuronParams, fire: Fire = fire_heaviside) -> Iterator[Tensor]:
    """Yield the signed-digit neuron's s_0..s_{T-1} ∈ {−1., 0., +1.} (like x) for x of shape (*B, *rest).

    r = x keeps its sign; s_t = [r > θ_sd(t)] − [−r > θ_sd(t)] (``fire`` both ways, so a surrogate
    spike function is two-sided), r ← r − h(t)·s_t. A budget K > 0 masks s_t once K steps were nonzero.
    """
    return _spike_train(x, params, params.signed_thresholds(),
                        lambda residual, threshold, t: fire(residual, threshold, t) - fire(-residual, threshold, t))


def _spike_train(values: Tensor, params: PhaseNeuronParams, thresholds: Tensor, spike: Fire) -> Iterator[Tensor]:
    """The loop both neurons run: s_t = spike(r, threshold(t), t), masked once K steps were nonzero (K > 0),
    then r ← r − h(t)·s_t, starting from r = values."""
    reset = _per_step(step_schedule(params)[1], values)
    threshold = _per_step(thresholds, values)
    budget = _per_element(params.max_spikes, values) if params.has_budget else None
    fired = torch.zeros_like(values) if budget is not None else None
    residual = values
    for t in range(params.T):
        spikes = spike(residual, threshold[t], t)
        if budget is not None:
            spikes = spikes * ((budget == 0) | (fired < budget)).to(spikes.dtype)
            fired = fired + spikes.detach().abs()
        yield spikes
        if t + 1 < params.T:  # the last step's reset is never read
            residual = torch.addcmul(residual, reset[t], spikes, value=-1)


def mask_late_spikes(spikes: Tensor, keep_steps: int | None) -> Tensor:
    """Late-spike masking (the paper's D.7): drop every spike at a step ≥ t0 + keep_steps, t0 the neuron's first
    spike (spikes [T, ...] bool, or a signed-digit neuron's int8 s_t ∈ {−1, 0, +1}: a −1 is a spike)."""
    if keep_steps is None:
        return spikes
    fired_before = (spikes != 0).int().cumsum(0)
    first = torch.where(fired_before > 0, 0, 1).sum(0)  # steps before the first spike = t0
    steps = torch.arange(spikes.shape[0], device=spikes.device).view(-1, *[1] * (spikes.dim() - 1))
    return torch.where(steps < first + keep_steps, spikes, torch.zeros((), dtype=spikes.dtype))


def weighted_spike_sum(params: PhaseNeuronParams, spikes: Iterable[Tensor], like: Tensor) -> Tensor:
    """Σ_t d(t)·s_t accumulated in step order, so every mode rounds identically (d(t)·s_t is exact)."""
    weights = _per_step(step_schedule(params)[0], like)
    total = torch.zeros_like(like)
    for d_t, s_t in zip(weights, spikes, strict=True):
        total = torch.addcmul(total, d_t, s_t)
    return total


def phase_encode(x: Tensor, params: PhaseNeuronParams) -> tuple[Tensor, Tensor]:
    """Spike mode: (σ as int8 like x, spikes as bool [T, *x.shape]); for a signed-digit neuron the spikes
    are int8 s_t ∈ {−1, 0, +1}, each carrying its own sign (σ is then not needed to decode)."""
    if params.signed_digits:
        spikes = torch.stack([s.to(torch.int8) for s in signed_spikes(x, params)])
        return torch.sign(x).to(torch.int8), spikes
    spikes = torch.stack([s.bool() for s in magnitude_spikes(x.abs(), params)])
    return torch.sign(x).to(torch.int8), spikes


def phase_decode(sign: Tensor, spikes: Tensor, params: PhaseNeuronParams, dtype: torch.dtype = torch.float32) -> Tensor:
    """x̂ = σ·Σ_t d(t)·s_t from the spike mode's (sign, spikes), in `dtype` (signed digits: Σ_t d(t)·s_t)."""
    if tuple(spikes.shape) != (params.T, *sign.shape):
        raise ValueError(f"phase_decode: spikes must be [T, *sign.shape] = {(params.T, *sign.shape)}, "
                         f"got {tuple(spikes.shape)}")
    like = sign.to(dtype)
    if params.signed_digits:
        return weighted_spike_sum(params, (plane.to(dtype) for plane in spikes), like)
    return like * weighted_spike_sum(params, (plane.to(like.dtype) for plane in spikes), like)


def phase_quantize(x: Tensor, params: PhaseNeuronParams, fire: Fire = fire_heaviside) -> Tensor:
    """Decoded mode: x̂, bitwise equal to phase_decode(*phase_encode(x)) without storing the T spike planes."""
    if params.signed_digits:
        return weighted_spike_sum(params, signed_spikes(x, params, fire), x)
    magnitude = x.abs()
    return torch.sign(x) * weighted_spike_sum(params, magnitude_spikes(magnitude, params, fire), magnitude)


def token_scales(x: Tensor, levels: int) -> Tensor:
    """Each row's run-time scale over the last dim (SDLLM's and QuaRot's per-token min-max): τ_row = max|x_row| /
    levels, kept as [..., 1]; 1 for a row of zeros (it stays zero). A neuron with per-token scales runs on x / τ_row
    at τ = 1 and its output is scaled back: x̂ = τ_row · x̂₁(x / τ_row)."""
    scale = x.abs().amax(dim=-1, keepdim=True) / levels
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def golden_base2(x: Tensor, tau, T: int) -> Tensor:
    """The all-base-2 neuron in closed form: σ·q·Δ, Δ = τ·2^-T, q = clamp(⌈|x|/Δ − ½⌉, 0, 2^T − 1).

    Round to nearest with ties toward zero: strict '>' does not fire at v = θ(t), and v0 = Δ/2 puts
    |x| = (q + ½)·Δ exactly on a threshold. Exact in float32 when τ is a power of two.
    """
    step = _per_element(torch.as_tensor(tau, dtype=x.dtype, device=x.device) * 2.0 ** -T, x)
    levels = torch.ceil(x.abs() / step - 0.5).clamp(0, 2**T - 1)
    return torch.sign(x) * levels * step


def signed_base2_params(tau, T: int, n: int = 1, genotype: Tensor | None = None) -> PhaseNeuronParams:
    """The signed-digit neuron with every base 2 (``golden_signed_base2`` in closed form)."""
    return dataclasses.replace(base2_params(tau, T, n, genotype), signed_digits=True)


def naf_boundaries(T: int) -> list[int]:
    """M_t = ⌊2^(T−t)/3⌋, t = 0..T−1: the largest integer the steps after t can reach in non-adjacent form."""
    return [2 ** (T - t) // 3 for t in range(T)]


def golden_signed_base2(x: Tensor, tau, T: int) -> tuple[Tensor, Tensor]:
    """The all-base-2 signed-digit neuron in closed form: (x̂, digits int8 [T, *x.shape]).

    Work in half levels, u = 2x/Δ with Δ = τ·2^-T (exact when τ is a power of two). Off a tie the
    neuron's decisions depend only on the nearest level q, so start from ρ_0 = 2q (q = round(u/2));
    at a tie (u an odd integer) from ρ_0 = u itself; clamp to ±2^(T+1) (saturation: every digit fires).
    Then the greedy non-adjacent form on integers, most significant digit first:
        s_t = sign(ρ_t)·[|ρ_t| > 2·M_t + 1],   ρ_{t+1} = ρ_t − 2^(T−t)·s_t,   M_t = ⌊2^(T−t)/3⌋,
        x̂ = Δ·Σ_t 2^(T−1−t)·s_t.
    Off ties x̂ = golden_base2(x) (the nearest level, saturating at ±(2^T − 1)·Δ) with the fewest nonzero
    digits any T-digit signed-binary code of that level has; at a tie x̂ is one of the two nearest levels.
    """
    step = _per_element(torch.as_tensor(tau, dtype=x.dtype, device=x.device) * 2.0 ** -T, x)
    limit = 2.0 ** (T + 1)
    half_units = (2 * x / step).clamp(-2 * limit, 2 * limit)
    tie = (half_units == torch.round(half_units)) & (torch.remainder(half_units, 2) == 1)
    residual = torch.where(tie, half_units, 2 * torch.round(half_units / 2)).clamp(-limit, limit).to(torch.int64)
    digits = []
    for t, boundary in enumerate(naf_boundaries(T)):
        digit = torch.sign(residual) * (residual.abs() > 2 * boundary + 1)
        residual = residual - 2 ** (T - t) * digit
        digits.append(digit.to(torch.int8))
    digits = torch.stack(digits)
    weights = torch.tensor([2.0 ** (T - 1 - t) for t in range(T)], dtype=x.dtype, device=x.device)
    value = (digits.to(x.dtype) * weights.reshape(T, *[1] * x.ndim)).sum(0) * step
    return value, digits


def _per_element(site_values: Tensor, x: Tensor) -> Tensor:
    """View [*B] site values as [*B, 1, ..., 1] against x of shape (*B, *rest)."""
    batch = tuple(site_values.shape)
    if tuple(x.shape[:len(batch)]) != batch:
        raise ValueError(f"neuron batch shape {batch} must be a prefix of the input shape {tuple(x.shape)}")
    return site_values.to(x.device).reshape(*batch, *[1] * (x.ndim - len(batch)))


def _per_step(schedule: Tensor, x: Tensor) -> Tensor:
    """[*B, T] schedule → [T, *B, 1, ..., 1], indexable by step and broadcastable against x."""
    return _per_element(schedule.movedim(-1, 0), x.unsqueeze(0).expand(schedule.shape[-1], *x.shape))

