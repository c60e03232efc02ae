"""Fitting phase neurons to calibration samples (docs/method.md §4), batched over sites (no loop over sites).

Per site, on all its samples, with the exact neuron of neuron.py (same v0, saturation, strict '>'):
1. Base-2 baseline: the all-base-2 neuron's MSE on the grid τ = max|x|·2^(-k/q) (clipping included),
   then on a grid 8x finer around the best; τ_2 = argmin. The fixed codings (codings.py: las, spikedattn,
   rate, ttfs, sdllm) stop here, with τ found the same way on their own closed forms.
2. Coupled search (distribution-aware start): random search with a shrinking radius over
   (log2 R, p_1..p_n) with d = h = θ = 1 + e^p per grain, R = Σ_t d(t) the largest output. Moving a base
   at fixed R reshapes the levels without rescaling them, which decouples the coordinates. Algorithm 1
   alone barely makes these moves: near d = h = θ each of its phases is close to a fixed point (the best
   decoder of a greedy code is near its encoder, and back), so its bases stay near their start.
3. Algorithm 1 from there, at that τ: alternate, `rounds` times,
   - hw_steps Adam steps on (p_h, p_θ), d fixed. Forward: the real neuron. Backward: ∂s_t/∂u ≈
     β_t·sig'(β_t·u), u = r − (θ(t) − v0), β_t = β/θ(t): the same relative sigmoid width at every step,
     however small its threshold (a fixed β on raw values would give late steps no gradient);
   - base_steps Adam steps on p_d, spikes fixed: x̂ = Σ_t d(t)·s_t is linear in the step weights w,
     so the MSE is exactly c − 2·bᵀw + wᵀ·A·w (A = E[s·sᵀ], b = E[|x|·s], c = E[x²]).
   Bases are b = 1 + e^p (> 1, and p = 0 is exactly 2). The loss is each site's MSE over its MSE at the
   start, so Adam sees O(1) numbers at any scale. The best bases seen per site (the start included) are
   kept as copies, never views of the live parameters.
4. The fitted neuron replaces base 2 at τ_2 only where its MSE is lower: mse ≤ base2_mse always.

Spike penalty (spike_penalty λ > 0, `phase` and `phase-sd`): every stage above minimises
J = MSE / MSE_2 + λ·E[spikes per activation] instead of the MSE, where MSE_2 is the site's base-2 MSE at τ_2, so
λ reads the same at every site: the relative MSE one spike per activation is worth. The coupled search and the
choices of steps 3-4 score J exactly; Algorithm 1's (h, θ) steps differentiate the spike count through the same
surrogate as the MSE (Σ_t s_t, each s_t with the sigmoid backward); the d steps leave the spikes unchanged.
Step 4 then keeps whichever of the fitted and the base-2 neuron has the lower J (so mse ≤ base2_mse no longer
holds). λ = 0 runs exactly the MSE fit.
"""

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from spikecompile.conversion.codings import CODINGS, SIGNED_CODINGS, closed_form, coding_params, sdllm_clip
from spikecompile.neuron import (
    PhaseNeuronParams, base2_params, even_genotype, fire_heaviside, golden_base2, magnitude_spikes, phase_quantize, signed_spikes,
    step_schedule,
)
from spikecompile.progress import shown

BASES = ("d", "h", "theta")
FITTED = ("phase", "phase-sd")  # the codings Algorithm 1 fits; the others are fixed (codings.py)
_FIELDS = tuple(f.name for f in fields(PhaseNeuronParams) if f.name != "signed_digits")  # the tensor fields
# Elements per op in the neuron loops: a few rows, so every op runs in cache (several times faster per core
# than one big batch). fit_sites runs them on one torch thread: a thread pool would only add a barrier
# per op, which costs 10-100x when another process keeps the cores busy.
CHUNK_ELEMENTS = 1 << 16
_chunk_pool = threading.local()
"""pool: the thread pool that runs _chunked's chunks in the thread that set it (fit_sites' own stages), else unset"""


@contextmanager
def _one_thread():
    """Run on one torch thread (yielding the caller's count), then restore the caller's count (usable as a
    decorator)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class FitConfig:
    """How to fit a site's neuron.

    T, n_grains: timesteps and grains; coding: "phase" or "phase-sd" (fitted; phase-sd the signed-digit neuron)
    or a fixed coding of codings.py (only τ chosen).
    membrane_clip: sdllm only, the share of calibration samples its clipping sends to a zero count (0: off).
    rounds, hw_steps, base_steps: N, N1, N2 of Algorithm 1; lr_hw, lr_base: Adam learning rates on the
    base parameters p (b = 1 + e^p); surrogate_beta: β, the sigmoid slope in units of 1/θ(t).
    tau_octaves, tau_per_octave: the base-2 τ grid max|x|·2^(-k/tau_per_octave), k = 0..octaves·per_octave.
    search_rounds, search_trials, search_radius: the coupled search (trials per round; the starting
    standard deviation of a trial in octaves of R and in p); seed: its random generator.
    spike_penalty: λ of J = MSE/MSE_2 + λ·E[spikes per activation] (module docstring; 0: the MSE fit).
    """

    T: int
    n_grains: int = 1
    coding: str = "phase"
    rounds: int = 4
    hw_steps: int = 20
    base_steps: int = 20
    lr_hw: float = 0.003
    lr_base: float = 0.003
    surrogate_beta: float = 20.0
    tau_octaves: int = 12
    tau_per_octave: int = 16
    search_rounds: int = 20
    search_trials: int = 8
    search_radius: float = 0.25
    membrane_clip: float = 0.0
    seed: int = 0
    spike_penalty: float = 0.0

    def __post_init__(self):
        if self.coding not in (*CODINGS, *SIGNED_CODINGS):
            raise ValueError(f"FitConfig: coding must be one of {(*CODINGS, *SIGNED_CODINGS)}, got {self.coding!r}")
        if not 0 <= self.membrane_clip < 1 or (self.membrane_clip and self.coding != "sdllm"):
            raise ValueError(f"FitConfig: membrane_clip must be in [0, 1) and only with coding sdllm, "
                             f"got {self.membrane_clip!r} with {self.coding!r}")
        if not 1 <= self.n_grains <= self.T:
            raise ValueError(f"FitConfig: need 1 ≤ n_grains ≤ T, got T={self.T}, n_grains={self.n_grains}")
        counts = {"rounds": self.rounds, "hw_steps": self.hw_steps, "base_steps": self.base_steps,
                      "tau_octaves": self.tau_octaves, "search_rounds": self.search_rounds}
        if any(value < 0 for value in counts.values()) or min(self.tau_per_octave, self.search_trials) < 1:
            raise ValueError(f"FitConfig: need {counts} ≥ 0 and tau_per_octave, search_trials ≥ 1")
        if not (math.isfinite(self.spike_penalty) and self.spike_penalty >= 0) or (
                self.spike_penalty and self.coding not in FITTED):
            raise ValueError(f"FitConfig: spike_penalty must be a finite number ≥ 0, and only with a fitted coding "
                             f"{FITTED}, got {self.spike_penalty!r} with {self.coding!r}")
        if min(self.lr_hw, self.lr_base, self.surrogate_beta, self.search_radius) <= 0:
            raise ValueError("FitConfig: lr_hw, lr_base, surrogate_beta and search_radius must be > 0")


@dataclass
class SiteFit:
    """The fit of S sites (leading dim S everywhere).

    params: the fitted neurons (batch shape [S]), exactly what runs at inference; mse: their MSE on the
    samples; base2_tau, base2_mse: the base-2 neuron at its own error-minimising τ (the baseline to
    report; mse ≤ base2_mse); max_abs: max|x|.
    """

    params: PhaseNeuronParams
    mse: Tensor
    base2_tau: Tensor
    base2_mse: Tensor
    max_abs: Tensor


def quantizer_mse(samples: Tensor, params: PhaseNeuronParams) -> Tensor:
    """Mean over the last dim of (x̂ − x)² for samples [*B, N] and a neuron of batch shape B."""
    return (phase_quantize(samples, params) - samples).square().mean(-1)


def quantizer_stats(samples: Tensor, params: PhaseNeuronParams) -> Tensor:
    """[*B, 2]: (MSE, spikes per activation) of a neuron of batch shape B on samples [*B, N].

    The MSE is quantizer_mse's, bit for bit; a spike is a nonzero step, as the simulator counts it (the
    unsigned neuron's spikes come from |x|, as phase_encode's planes)."""
    fired = []
    xhat = phase_quantize(samples, params, _recording(fire_heaviside, fired))
    mse = (xhat - samples).square().mean(-1)
    return torch.stack([mse, sum(spikes.mean(-1) for spikes in fired)], dim=-1)


def spikes_per_activation(samples: Tensor, params: PhaseNeuronParams) -> Tensor:
    """[*B] mean nonzero steps per activation of samples [*B, N] (a few rows at a time)."""
    return _chunked_stats(samples, params)[..., 1]


def _recording(fire, fired: list):
    """fire, appending each spike plane it returns to `fired` (a signed neuron calls it for +r and −r: both
    planes are 0/1 and never 1 together, so their sum counts the nonzero digits)."""
    def spike(residual, threshold, t):
        value = fire(residual, threshold, t)
        fired.append(value)
        return value

    return spike


def _objective(stats: Tensor, cfg: FitConfig, reference: Tensor) -> Tensor:
    """J = MSE/MSE_2 + λ·spikes for stats [S, *C, 2] and the base-2 MSE reference [S]."""
    scale = reference.reshape(-1, *[1] * (stats.ndim - 2))
    return stats[..., 0] / scale + cfg.spike_penalty * stats[..., 1]


def fit_sites(samples: Tensor, cfg: FitConfig, genotypes: Tensor | None = None,
              progress: Callable[[int, int], None] | bool | None = None,
              names: Sequence[str] | None = None) -> SiteFit:
    """Fit one neuron per row of samples [S, N] (genotypes [S, T], even blocks by default).

    τ minimises the error on these samples only, so they should hold each site's largest |x|: a value
    absent from them may be clipped at inference. progress: called as progress(done, total) after every
    Adam step; True shows a tqdm bar instead. names: the rows' site names, for the errors (default: row indices).
    Runs on one torch thread (restored after): see CHUNK_ELEMENTS; Algorithm 1 on as many Python threads as the
    caller had torch threads, each fitting its own sites (_algorithm1_in_parallel).
    """
    with _one_thread() as threads, _chunks_in_parallel(threads):
        return _fit_sites(samples, cfg, genotypes, progress, names, threads)


@contextmanager
def _chunks_in_parallel(workers: int):
    """Inside the block, _chunked (called from this thread) runs its chunks on `workers` Python threads, each on one
    torch thread: the chunks are independent and joined in order, so the result is the serial one bit for bit.
    Algorithm 1's own threads (_algorithm1_in_parallel) see no pool and run their chunks in turn."""
    if workers <= 1 or getattr(_chunk_pool, "pool", None) is not None:
        yield
        return
    with ThreadPoolExecutor(workers) as pool:
        _chunk_pool.pool = pool
        try:
            yield
        finally:
            _chunk_pool.pool = None


def _fit_sites(samples: Tensor, cfg: FitConfig, genotypes: Tensor | None, progress, names, workers: int) -> SiteFit:
    samples = samples.to(torch.float32)
    if samples.ndim != 2 or samples.numel() == 0:
        raise ValueError(f"fit_sites: samples must be [S, N] with S, N ≥ 1, got {tuple(samples.shape)}")
    bad = (~torch.isfinite(samples)).any(-1).nonzero().flatten().tolist()
    if bad:
        which = ", ".join(str(names[index]) for index in bad[:10]) if names is not None else str(bad[:10])
        raise ValueError(f"fit_sites: samples of sites {which} are not all finite; drop or clean them")
    genotypes = _site_genotypes(genotypes, cfg, samples.shape[0], samples.device)
    max_abs = samples.abs().amax(-1)
    base2 = best_base2(samples, cfg, genotypes, max_abs)
    if cfg.coding == "phase-sd":  # the same levels off ties (golden_signed_base2), so the same τ_2
        base2 = replace(base2, signed_digits=True)
    if cfg.coding not in FITTED:
        base2_mse = _chunked_mse(samples, base2)
        params = base2 if cfg.coding == "las" else _fixed_coding(samples, max_abs, cfg, genotypes)
        mse = base2_mse if cfg.coding == "las" else _chunked_mse(samples, params)
        return SiteFit(params=params, mse=mse, base2_tau=base2.tau, base2_mse=base2_mse, max_abs=max_abs)
    magnitude = samples.abs()
    # J's unit (spike penalty only): the base-2 MSE, the same at every stage of the fit
    reference = _chunked_mse(magnitude, base2).clamp(min=torch.finfo(torch.float32).tiny) if cfg.spike_penalty else None
    with _progress_callback(progress) as report:
        start = _coupled_search(magnitude, base2.tau, genotypes, cfg, reference)
        fitted = _algorithm1_in_parallel(magnitude, start, cfg, report, reference, workers)
    both = PhaseNeuronParams(**{name: torch.stack([getattr(fitted, name), getattr(base2, name)], dim=1)
                                for name in _FIELDS}, signed_digits=base2.signed_digits)
    if reference is None:
        mse = _chunked_mse(samples[:, None].expand(-1, 2, -1), both)
        score = mse
    else:
        stats = _chunked_stats(samples[:, None].expand(-1, 2, -1), both)
        mse, score = stats[..., 0], _objective(stats, cfg, reference)
    sites, winner = torch.arange(len(mse), device=mse.device), score.argmin(-1)
    params = PhaseNeuronParams(**{name: getattr(both, name)[sites, winner] for name in _FIELDS},
                               signed_digits=both.signed_digits)
    return SiteFit(params=params, mse=mse[sites, winner], base2_tau=base2.tau, base2_mse=mse[:, 1],
                   max_abs=max_abs)


@_one_thread()
def lloyd_max_mse(samples: Tensor, levels: int, iterations: int = 100) -> Tensor:
    """MSE [*B] of a Lloyd-Max quantizer with `levels` reconstruction levels on samples [*B, N].

    Lloyd's iteration (cells at midpoints between levels, levels at cell centroids) from the quantiles
    of the p^(1/3)-companded distribution, the high-rate optimum; p is estimated from sorted-sample gaps
    (p ∝ 1/gap, so each gap weighs gap^(2/3)). Lloyd finds a local optimum, so this is a lower bound for
    quantizers of that many levels only up to that; with levels = 2^(T+1) − 1 it bounds any T-step
    binary code (docs/method.md §4). Computed in float64 with prefix sums over the sorted samples, on one
    torch thread (restored after).
    """
    x = samples.to(torch.float64).sort(-1).values
    count = x.shape[-1]
    if levels >= count:
        return torch.zeros(x.shape[:-1], dtype=samples.dtype, device=samples.device)
    prefix = torch.nn.functional.pad(x.cumsum(-1), (1, 0))
    level = _companded_quantiles(x, levels)
    for _ in range(iterations):
        cuts = torch.searchsorted(x, (level[..., 1:] + level[..., :-1]) / 2)
        bounds = torch.nn.functional.pad(torch.nn.functional.pad(cuts, (1, 0), value=0), (0, 1), value=count)
        members = bounds.diff(dim=-1)
        total = prefix.gather(-1, bounds[..., 1:]) - prefix.gather(-1, bounds[..., :-1])
        level = torch.where(members > 0, total / members.clamp(min=1), level)
    cell = torch.searchsorted((level[..., 1:] + level[..., :-1]) / 2, x)
    return (x - level.gather(-1, cell)).square().mean(-1).to(samples.dtype)


def _companded_quantiles(x: Tensor, levels: int) -> Tensor:
    """Levels at equal steps of ∫p^(1/3) along sorted samples x [*B, N] (smoothed gaps, weight gap^(2/3))."""
    count = x.shape[-1]
    span = max(1, min(16, count // levels))
    gap = (x[..., span:] - x[..., :-span]) / span
    weight = torch.nn.functional.pad(gap, (span // 2, span - span // 2 - 1), mode="replicate").pow(2 / 3)
    mass = torch.nn.functional.pad(weight.cumsum(-1), (1, 0))
    target = mass[..., -1:] * (torch.arange(levels, dtype=x.dtype, device=x.device) + 0.5) / levels
    return x.gather(-1, torch.searchsorted(mass, target).clamp(max=count - 1))


def _base2_tau(samples: Tensor, max_abs: Tensor, cfg: FitConfig) -> Tensor:
    """[S] τ with the lowest base-2 MSE: the grid max|x|·2^(-k/q), then 8x finer within one grid step."""
    return _grid_tau(samples, max_abs, cfg, lambda rows, tau: golden_base2(rows, tau, cfg.T))


def best_base2(samples: Tensor, cfg: FitConfig, genotypes: Tensor | None = None,
               max_abs: Tensor | None = None) -> PhaseNeuronParams:
    """The base-2 neurons [S] (every base 2, cfg.T steps, cfg.n_grains grains) at the τ with each site's lowest
    MSE on its samples [S, N]: the baseline the fit starts from, and the per-T neuron of the budget curves.
    max_abs: the samples' max |x| per site, when the caller has it."""
    max_abs = samples.abs().amax(-1) if max_abs is None else max_abs
    return base2_params(_base2_tau(samples, max_abs, cfg), cfg.T, cfg.n_grains, genotypes)


def _grid_tau(samples: Tensor, max_abs: Tensor, cfg: FitConfig, quantize, octaves_above: int = 0) -> Tensor:
    """[S] τ with the lowest MSE of quantize(rows [s, N], τ [s]) -> x̂ on the grid max|x|·2^(-k/q),
    k = −octaves_above·q .. tau_octaves·q, then 8x finer within one grid step."""
    q = cfg.tau_per_octave
    coarse = torch.exp2(-torch.arange(-octaves_above * q, cfg.tau_octaves * q + 1, device=samples.device) / q)
    tau = torch.where(max_abs > 0, max_abs, 1.0)

    def grid_mse(rows, taus):
        return torch.stack([(quantize(rows, tau) - rows).square().mean(-1) for tau in taus.T], dim=1)

    for factors in (coarse, torch.exp2(torch.arange(-8, 9, device=samples.device) / (8 * q))):
        grid = tau[:, None] * factors
        mse = _chunked(grid_mse, (len(samples),), samples.shape[-1], samples, grid)
        tau = grid.gather(1, mse.argmin(-1, keepdim=True)).squeeze(1)
    return tau


def _fixed_coding(samples: Tensor, max_abs: Tensor, cfg: FitConfig, genotypes: Tensor) -> PhaseNeuronParams:
    """The neurons [S] of a fixed coding (codings.py) at the τ with the lowest error of its closed form."""
    magnitude = samples.abs()

    def clip(rows, tau):
        return sdllm_clip(rows, tau, cfg.membrane_clip) if cfg.coding == "sdllm" else None

    def quantize(rows, tau):
        magnitudes = rows.abs()
        return torch.sign(rows) * closed_form(cfg.coding, magnitudes, tau, cfg.T, clip(magnitudes, tau))

    # sparse level sets (a spike budget, few rate levels) can place their best top level above max|x|
    tau = _grid_tau(samples, max_abs, cfg, quantize, octaves_above=1)
    grain_genotypes = genotypes if cfg.coding in ("spikedattn", "ttfs") else None
    return coding_params(cfg.coding, tau, cfg.T, cfg.n_grains, clip(magnitude, tau), grain_genotypes)


def _coupled_search(magnitude: Tensor, tau2: Tensor, genotypes: Tensor, cfg: FitConfig,
                    reference: Tensor | None = None) -> PhaseNeuronParams:
    """Random search for the coupled neuron (d = h = θ per grain) with the lowest MSE on magnitude [S, N].

    A point is (log2(R/R_2), p_1..p_n), R_2 the base-2 neuron's largest output; point 0 is base 2 at τ_2.
    Each round tries search_trials Gaussian steps around the best point; the radius shrinks by 0.7 after
    a round without improvement. With a spike penalty (reference: the base-2 MSE [S]) the score is J, not the MSE.
    """

    def score(rows, neuron):
        if reference is None:
            return _chunked_mse(rows, neuron)
        return _objective(_chunked_stats(rows, neuron), cfg, reference)

    sites, trials, n = len(magnitude), cfg.search_trials, cfg.n_grains
    generator = torch.Generator(device=magnitude.device).manual_seed(cfg.seed)
    reach2 = (tau2 * (1 - 2.0 ** -cfg.T))[:, None]
    point = torch.zeros(sites, 1, n + 1, device=magnitude.device)
    signed = cfg.coding == "phase-sd"
    best = score(magnitude[:, None], _coupled_neuron(point, reach2, genotypes[:, None], signed))[:, 0]
    radius = torch.full((sites, 1, 1), cfg.search_radius, device=magnitude.device)
    many, rows = magnitude[:, None].expand(-1, trials, -1), torch.arange(sites, device=magnitude.device)
    for _ in range(cfg.search_rounds):
        trial = point + radius * torch.randn(sites, trials, n + 1, generator=generator, device=magnitude.device)
        mse = score(many, _coupled_neuron(trial, reach2, genotypes[:, None].expand(-1, trials, -1), signed))
        winner = mse.argmin(-1)
        found = mse[rows, winner] < best
        best = torch.where(found, mse[rows, winner], best)
        point = torch.where(found[:, None, None], trial[rows, winner][:, None], point)
        radius = torch.where(found[:, None, None], radius, 0.7 * radius)
    neuron = _coupled_neuron(point, reach2, genotypes[:, None], signed)
    return PhaseNeuronParams(**{name: getattr(neuron, name)[:, 0] for name in _FIELDS}, signed_digits=signed)


def _coupled_neuron(point: Tensor, reach2: Tensor, genotypes: Tensor, signed: bool = False) -> PhaseNeuronParams:
    """Neurons [S, C] with d = h = θ = 1 + e^p per grain and largest output R_2·2^point[..., 0]."""
    bases = 1 + torch.exp(point[..., 1:])
    genotypes = genotypes.expand(*point.shape[:-1], -1)
    unit = PhaseNeuronParams(tau=torch.ones_like(point[..., 0]), genotype=genotypes, d=bases, h=bases, theta=bases,
                             signed_digits=signed)
    return replace(unit, tau=reach2 * torch.exp2(point[..., 0]) / step_schedule(unit)[0].sum(-1), v0=None)


class _SurrogateSpike(torch.autograd.Function):
    """Forward: [r > θ'] exactly as the neuron; backward: slope·sig'(slope·(r − θ'))."""

    @staticmethod
    def forward(ctx, residual, threshold, slope):
        ctx.save_for_backward(residual, threshold, slope)
        return (residual > threshold).to(residual.dtype)

    @staticmethod
    def backward(ctx, grad):
        residual, threshold, slope = ctx.saved_tensors
        sig = torch.sigmoid(slope * (residual - threshold))
        grad_u = grad * slope * sig * (1 - sig)
        return grad_u, (-grad_u).sum_to_size(threshold.shape), None


def _surrogate_mse(magnitude: Tensor, neuron: PhaseNeuronParams, beta: float,
                   spikes: list | None = None) -> Tensor:
    """[S] MSE of the real neuron on magnitude [S, N], differentiable in h, θ through the surrogate; with a list
    `spikes`, appends [S] spikes per activation to it, differentiable through the same surrogate."""
    slope = (beta / step_schedule(neuron)[2].detach()).unsqueeze(-1)

    def fire(residual, threshold, t):
        return _SurrogateSpike.apply(residual, threshold, slope[:, t])

    fired = []
    mse = (phase_quantize(magnitude, neuron, fire if spikes is None else _recording(fire, fired))
           - magnitude).square().mean(-1)
    if spikes is not None:
        spikes.append(sum(plane.mean(-1) for plane in fired))
    return mse


def _algorithm1(magnitude: Tensor, start: PhaseNeuronParams, cfg: FitConfig,
                progress: Callable[[int, int], None] | None, reference: Tensor | None = None) -> PhaseNeuronParams:
    """Algorithm 1 on magnitude [S, N] from start [S]; returns the best bases seen per site.

    reference (spike penalty only): the base-2 MSE [S]; the loss and the choice of the best bases are then
    J = MSE/reference + λ·spikes (module docstring), else each site's MSE over its MSE at the start."""
    raw = {name: torch.log(getattr(start, name) - 1).requires_grad_() for name in BASES}
    penalty = cfg.spike_penalty if reference is not None else 0.0

    def neuron(rows=slice(None), trained=()):
        return _take(start, rows).derived(**{
            name: 1 + torch.exp(raw[name][rows] if name in trained else raw[name][rows].detach()) for name in BASES})

    def objective(mse, spikes):
        return mse if not penalty else mse / scale + penalty * spikes

    with torch.no_grad():
        if penalty:
            scale = reference.double()
            best_mse = _objective(_chunked_stats(magnitude, neuron()).double(), cfg, scale)
        else:
            scale = _chunked_mse(magnitude, neuron()).double()
            best_mse = scale
    best = {name: getattr(neuron(), name) for name in BASES}
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)

    def track(mse, current):
        nonlocal best_mse
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        for name in BASES:
            best[name] = torch.where(better[:, None], getattr(current, name).detach(), best[name])

    hw = torch.optim.Adam([raw["h"], raw["theta"]], lr=cfg.lr_hw)
    base = torch.optim.Adam([raw["d"]], lr=cfg.lr_base)
    total, done = cfg.rounds * (cfg.hw_steps + cfg.base_steps), 0
    for _ in range(cfg.rounds):
        for _ in range(cfg.hw_steps):
            hw.zero_grad()
            mse, spikes = [], [] if penalty else None
            for rows in _row_chunks((len(magnitude),), magnitude.shape[-1]):
                chunk_mse = _surrogate_mse(magnitude[rows], neuron(rows, trained=("h", "theta")), cfg.surrogate_beta,
                                           spikes)
                loss = chunk_mse / scale[rows]
                if penalty:
                    loss = loss + penalty * spikes[-1]
                    spikes[-1] = spikes[-1].detach()
                loss.sum().backward()
                mse.append(chunk_mse.detach())
            track(objective(torch.cat(mse).double(), torch.cat(spikes).double() if penalty else None), neuron())
            hw.step()
            done += 1
            if progress:
                progress(done, total)
        with torch.no_grad():
            quadratic = _spike_moments(magnitude, neuron())
            # the d steps leave every spike where it is: J's spike term is a constant of this phase
            fixed_spikes = _chunked_stats(magnitude, neuron())[:, 1].double() if penalty else None
        for _ in range(cfg.base_steps):
            base.zero_grad()
            current = neuron(trained=("d",))
            mse = quadratic(step_schedule(current)[0].double())
            track(objective(mse.detach(), fixed_spikes), current)
            (mse / scale).sum().backward()
            base.step()
            done += 1
            if progress:
                progress(done, total)
    with torch.no_grad():
        if penalty:
            track(_objective(_chunked_stats(magnitude, neuron()).double(), cfg, scale), neuron())
        else:
            track(_chunked_mse(magnitude, neuron()).double(), neuron())
    return replace(start, **best)


def _algorithm1_in_parallel(magnitude: Tensor, start: PhaseNeuronParams, cfg: FitConfig,
                            progress: Callable[[int, int], None] | None, reference: Tensor | None,
                            workers: int) -> PhaseNeuronParams:
    """_algorithm1 on `workers` contiguous groups of sites, one Python thread each (torch ops release the GIL; each
    thread runs on one torch thread). Every step of Algorithm 1 is per site (losses summed over sites, Adam
    elementwise), so the groups fit as the whole would."""
    workers = min(workers, len(magnitude))
    if workers <= 1 or magnitude.device.type != "cpu":
        return _algorithm1(magnitude, start, cfg, progress, reference)
    bounds = [len(magnitude) * worker // workers for worker in range(workers + 1)]
    groups = [torch.arange(low, high) for low, high in zip(bounds, bounds[1:])]

    def fit(worker: int) -> PhaseNeuronParams:
        rows = (groups[worker],)
        return _algorithm1(magnitude[rows], _take(start, rows), cfg, progress if worker == 0 else None,
                           None if reference is None else reference[rows])

    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(fit, range(workers)))
    return PhaseNeuronParams(**{name: torch.cat([getattr(part, name) for part in parts]) for name in _FIELDS},
                             signed_digits=start.signed_digits)


def _spike_moments(magnitude: Tensor, neuron: PhaseNeuronParams) -> Callable[[Tensor], Tensor]:
    """With spikes fixed, MSE(w) = c − 2·bᵀw + wᵀ·A·w for step weights w [S, T], in float64."""
    def moments(values, chunk):
        # x = 0 has σ = 0, so its spikes never reach the output (a signed neuron fires nothing there).
        fired = signed_spikes(values, chunk) if chunk.signed_digits else magnitude_spikes(values, chunk)
        spikes = torch.stack(list(fired), dim=-2) * (values > 0).unsqueeze(-2)
        # Sums of 0/1 products are exact in float32 below 2^24 samples.
        second = (spikes @ spikes.transpose(-1, -2)).double().flatten(1)
        first = (spikes.double() @ values.double().unsqueeze(-1)).squeeze(-1)
        return torch.cat([second, first, values.double().square().sum(-1, keepdim=True)], dim=1) / values.shape[-1]

    steps = neuron.T
    stats = _chunked(moments, (len(magnitude),), magnitude.shape[-1], magnitude, neuron)
    second = stats[:, :steps * steps].view(-1, steps, steps)
    first, energy = stats[:, steps * steps:-1], stats[:, -1]

    def mse(weights):
        quadratic = (weights.unsqueeze(-2) @ second @ weights.unsqueeze(-1))[:, 0, 0]
        return energy - 2 * (first * weights).sum(-1) + quadratic

    return mse


def _row_chunks(batch_shape: tuple[int, ...], row_elements: int) -> list[tuple[Tensor, ...]]:
    """Index tuples into batch_shape, each selecting consecutive rows of ≤ CHUNK_ELEMENTS elements (≥ 1 row)."""
    rows, step = math.prod(batch_shape), max(1, CHUNK_ELEMENTS // max(1, row_elements))
    return [torch.unravel_index(torch.arange(start, min(start + step, rows)), tuple(batch_shape))
            for start in range(0, rows, step)]


def _take(value, index: tuple[Tensor, ...]):
    """value[index] of a tensor, or of every field of a neuron."""
    if isinstance(value, PhaseNeuronParams):
        return value.derived(**{name: getattr(value, name)[index] for name in _FIELDS})
    return value[index]


def _chunked(fn, batch_shape: tuple[int, ...], row_elements: int, *args) -> Tensor:
    """fn applied to row chunks of args (tensors or neurons with leading batch_shape), reassembled; on the threads of
    _chunks_in_parallel where the caller set them."""
    def run(index):
        return fn(*(_take(arg, index) for arg in args))

    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run_as_caller(index):  # grad and inference modes are per thread: a worker takes the caller's
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return run(index)

    chunks, pool = _row_chunks(batch_shape, row_elements), getattr(_chunk_pool, "pool", None)
    out = torch.cat(list(pool.map(run_as_caller, chunks)) if pool is not None and len(chunks) > 1
                    else [run(index) for index in chunks])
    return out.reshape(*batch_shape, *out.shape[1:])


def _chunked_stats(samples: Tensor, params: PhaseNeuronParams) -> Tensor:
    """quantizer_stats [*B, 2] of samples [*B, N], a few rows at a time."""
    return _chunked(quantizer_stats, tuple(params.batch_shape), samples.shape[-1], samples, params)


def _chunked_mse(samples: Tensor, params: PhaseNeuronParams) -> Tensor:
    """quantizer_mse [*B] of samples [*B, N], a few rows at a time (same values, faster, less memory)."""
    return _chunked(quantizer_mse, tuple(params.batch_shape), samples.shape[-1], samples, params)


@contextmanager
def _progress_callback(progress: Callable[[int, int], None] | bool | None):
    """Yield a progress(done, total) callable (or None): the caller's, or a tqdm bar for True."""
    if progress is None or progress is False or callable(progress):
        yield progress or None
        return
    if progress is not True:
        raise TypeError(f"fit_sites: progress must be a callable progress(done, total) or a bool, got {progress!r}")
    from tqdm.auto import tqdm

    with tqdm(desc="fit", unit="step", disable=not shown(True)) as bar:
        def report(done, total):
            bar.total = total
            bar.update(done - bar.n)
        yield report


def _site_genotypes(genotypes: Tensor | None, cfg: FitConfig, sites: int, device) -> Tensor:
    if genotypes is None:
        return even_genotype(cfg.T, cfg.n_grains).to(device).expand(sites, cfg.T).contiguous()
    if tuple(genotypes.shape) != (sites, cfg.T):
        raise ValueError(f"fit_sites: genotypes must be [S, T] = {(sites, cfg.T)}, got {tuple(genotypes.shape)}")
    return genotypes.to(device=device, dtype=torch.int64)
