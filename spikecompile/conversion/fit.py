"""Fitting phase neurons to calibration samples: τ by error, then Algorithm 1 (method.md §4).

Every function is batched over sites (leading dim S) and has no Python loop over sites.

1. τ per site: the all-base-2 neuron's MSE on a geometric grid τ = max|x|·2^(-k/q) (clipping included);
   τ_2 = argmin is the base-2 baseline.
2. "phase" coding: Algorithm 1 at a few τ around τ_2 (one batch of sites × candidates), on a fixed
   strided subset of the sorted |x|. Bases are b = 1 + e^p (p = 0 is base 2, and b > 1 always).
   Alternate, `rounds` times:
     - hw_steps Adam steps on (p_h, p_θ), d fixed. Forward: the real neuron (same v0, saturation, strict
       '>'); backward: ∂s_t/∂u ≈ β_t·sig'(β_t·u), u = r − (θ(t) − v0), with β_t = β/θ(t) so every step sees
       the same relative sigmoid width, however small its threshold.
     - base_steps Adam steps on p_d, spikes fixed: x̂ = Σ_t d(t)·s_t is then linear in the step weights,
       so the MSE is the exact quadratic form c − 2·bᵀw + wᵀ·A·w (A = E[s·sᵀ], b = E[|x|·s], c = E[x²]).
   The loss is each site's MSE over its base-2 MSE at that τ (Adam sees O(1) numbers whatever the scale).
   The best bases seen per (site, candidate), the initial base-2 ones included, are kept as copies;
   on all samples the fitted neuron is kept only where it beats base 2 at its τ, and each site keeps
   its best candidate, so the fitted MSE is never above the base-2 baseline.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from spikecompile.conversion.neuron import (
    PhaseNeuronParams, base2_params, even_genotype, golden_base2, magnitude_spikes, phase_quantize, step_schedule,
)

CODINGS = ("phase", "las")


@dataclass(frozen=True)
class FitConfig:
    """How to fit a site's neuron.

    T, n_grains: timesteps and grains; coding: "phase" (Algorithm 1) or "las" (base 2, only τ chosen).
    rounds, hw_steps, base_steps: N, N1, N2 of Algorithm 1; lr_hw, lr_base: Adam learning rates on the
    base parameters p (b = 1 + e^p); surrogate_beta: β, the sigmoid slope in units of 1/θ(t).
    tau_octaves, tau_per_octave: the τ grid max|x|·2^(-k/tau_per_octave), k = 0..tau_octaves·tau_per_octave.
    tau_candidates: how many τ (τ_2 and its grid neighbours, alternating above and below) are fitted.
    fit_samples: size of the strided subset of sorted |x| that Algorithm 1 trains on.
    """

    T: int
    n_grains: int = 1
    coding: str = "phase"
    rounds: int = 4
    hw_steps: int = 20
    base_steps: int = 20
    lr_hw: float = 0.01
    lr_base: float = 0.01
    surrogate_beta: float = 4.0
    tau_octaves: int = 12
    tau_per_octave: int = 8
    tau_candidates: int = 3
    fit_samples: int = 2048

    def __post_init__(self):
        if self.coding not in CODINGS:
            raise ValueError(f"FitConfig: coding must be one of {CODINGS}, got {self.coding!r}")
        if not 1 <= self.n_grains <= self.T:
            raise ValueError(f"FitConfig: need 1 ≤ n_grains ≤ T, got T={self.T}, n_grains={self.n_grains}")
        counts = dict(rounds=self.rounds, hw_steps=self.hw_steps, base_steps=self.base_steps)
        if any(value < 0 for value in counts.values()):
            raise ValueError(f"FitConfig: step counts must be ≥ 0, got {counts}")
        sizes = dict(tau_per_octave=self.tau_per_octave, tau_candidates=self.tau_candidates,
                     fit_samples=self.fit_samples)
        if any(value < 1 for value in sizes.values()) or self.tau_octaves < 0:
            raise ValueError(f"FitConfig: need tau_octaves ≥ 0 and {sizes} all ≥ 1")
        if min(self.lr_hw, self.lr_base, self.surrogate_beta) <= 0:
            raise ValueError("FitConfig: lr_hw, lr_base and surrogate_beta must be > 0")


@dataclass
class SiteFit:
    """The fit of S sites (leading dim S everywhere).

    params: the fitted neurons (batch shape [S]), exactly what runs at inference;
    mse: their MSE on the samples; base2_tau, base2_mse: the base-2 neuron at its own error-minimising τ
    (the baseline to report; mse ≤ base2_mse); max_abs: max|x| per site.
    """

    params: PhaseNeuronParams
    mse: Tensor
    base2_tau: Tensor
    base2_mse: Tensor
    max_abs: Tensor


def quantizer_mse(samples: Tensor, params: PhaseNeuronParams) -> Tensor:
    """Mean over the last dim of (x̂ − x)² for samples [*B, N] and a neuron of batch shape B."""
    return (phase_quantize(samples, params) - samples).square().mean(-1)


def fit_sites(samples: Tensor, cfg: FitConfig, genotypes: Tensor | None = None,
              progress: Callable[[int, int], None] | None = None) -> SiteFit:
    """Fit one neuron per row of samples [S, N]; progress(done, total) is called after every Adam step."""
    samples = samples.to(torch.float32)
    if samples.ndim != 2 or samples.shape[1] < 1:
        raise ValueError(f"fit_sites: samples must be [S, N] with N ≥ 1, got {tuple(samples.shape)}")
    sites = samples.shape[0]
    genotypes = _site_genotypes(genotypes, cfg, sites, samples.device)
    max_abs = samples.abs().amax(-1)
    grid = _tau_grid(max_abs, cfg)
    best = _base2_grid_mse(samples, grid, cfg.T).argmin(-1)
    base2_tau = grid.gather(-1, best[:, None]).squeeze(-1)
    if cfg.coding == "las":
        params = base2_params(base2_tau, cfg.T, cfg.n_grains, genotypes)
        mse = quantizer_mse(samples, params)
        return SiteFit(params=params, mse=mse, base2_tau=base2_tau, base2_mse=mse, max_abs=max_abs)

    subset = _training_subset(samples, cfg.fit_samples)
    start_tau, start_base = _coupled_search(subset, base2_tau, genotypes, cfg)
    taus = torch.stack([base2_tau, start_tau], dim=1)
    init = torch.stack([torch.full_like(start_base, 2.0), start_base], dim=1)
    fitted = _algorithm1(subset, taus, genotypes[:, None].expand(*taus.shape, cfg.T), init, cfg, progress)
    base2 = base2_params(base2_tau, cfg.T, cfg.n_grains, genotypes)
    candidates = PhaseNeuronParams(**{
        name: torch.cat([getattr(fitted, name), getattr(base2, name)[:, None]], dim=1)
        for name in ("tau", "genotype", "d", "h", "theta")})
    mse = quantizer_mse(samples[:, None].expand(sites, 3, samples.shape[1]), candidates)
    pick = _picker(mse.argmin(-1))
    params = PhaseNeuronParams(**{name: pick(getattr(candidates, name)) for name in ("tau", "genotype", "d", "h", "theta")})
    return SiteFit(params=params, mse=pick(mse), base2_tau=base2_tau, base2_mse=mse[:, -1], max_abs=max_abs)


def _coupled_search(magnitude, tau, genotypes, cfg, iterations=30):
    """Pattern search over (log2 R, p_g) with d = h = θ per grain, exact neuron MSE on magnitude [S, M]."""
    sites, n = tau.shape[0], cfg.n_grains
    point = torch.zeros(sites, n + 1)
    step = torch.tensor([0.25] + [0.25] * n).expand(sites, n + 1).clone()
    directions = torch.cat([torch.zeros(1, n + 1), torch.eye(n + 1), -torch.eye(n + 1)])
    C = directions.shape[0]
    geno = genotypes[:, None].expand(sites, C, cfg.T)
    x = magnitude[:, None].expand(sites, C, magnitude.shape[-1])
    exponent = torch.arange(1, cfg.T + 1, dtype=torch.float32)
    def neuron_at(pt):
        bases = 1 + torch.exp(pt[..., 1:])
        reach = torch.pow(bases.gather(-1, geno[..., :pt.shape[-2], :] if False else genotypes.expand(*pt.shape[:-1], cfg.T) if pt.ndim==2 else geno), -exponent).sum(-1)
        return bases, reach
    for _ in range(iterations):
        trial = point[:, None] + directions * step[:, None]
        bases = 1 + torch.exp(trial[..., 1:])
        reach = torch.pow(bases.gather(-1, geno), -exponent).sum(-1)
        taus = tau[:, None] * (1 - 2.0 ** -cfg.T) * torch.exp2(trial[..., 0]) / reach
        neuron = PhaseNeuronParams(tau=taus, genotype=geno, d=bases, h=bases.clone(), theta=bases.clone())
        mse = quantizer_mse(x, neuron)
        best = mse.argmin(-1)
        point = trial[torch.arange(sites), best]
        tau_best = taus[torch.arange(sites), best]
        step = torch.where((best == 0)[:, None], step / 2, step)
    return tau_best, 1 + torch.exp(point[:, 1:])


def lloyd_max_mse(samples: Tensor, levels: int, iterations: int = 300) -> Tensor:
    """MSE [*B] of a Lloyd-Max quantizer with `levels` reconstruction levels on samples [*B, N].

    Lloyd's iteration (cells at midpoints between levels, levels at cell centroids) from the quantiles
    of the p^(1/3)-companded distribution, the high-rate optimum; p is estimated from sorted-sample gaps
    (p ∝ 1/gap, so each gap weighs gap^(2/3)). Lloyd finds a local optimum, so this is a lower bound for
    quantizers of that many levels only up to that; with levels = 2^(T+1) − 1 it bounds any T-step
    binary code (method.md §4). Computed in float64 with prefix sums over the sorted samples.
    """
    x = samples.to(torch.float64).sort(-1).values
    count = x.shape[-1]
    if levels >= count:
        return torch.zeros(x.shape[:-1], dtype=samples.dtype, device=samples.device)
    prefix = torch.nn.functional.pad(x.cumsum(-1), (1, 0))
    level = _companded_quantiles(x, levels)
    for _ in range(iterations):
        cuts = torch.searchsorted(x, (level[..., 1:] + level[..., :-1]) / 2)
        bounds = torch.nn.functional.pad(cuts, (1, 0), value=0)
        bounds = torch.nn.functional.pad(bounds, (0, 1), value=count)
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
        return grad_u.sum_to_size(residual.shape), (-grad_u).sum_to_size(threshold.shape), None


def _algorithm1(magnitude: Tensor, taus: Tensor, genotypes: Tensor, init: Tensor, cfg: FitConfig,
                progress: Callable[[int, int], None] | None) -> PhaseNeuronParams:
    """Best bases per (site, candidate) over Algorithm 1 on magnitudes [S, M] at τ [S, K]."""
    magnitude = magnitude[:, None].expand(*taus.shape, magnitude.shape[-1])
    raw = {name: torch.log(init - 1).requires_grad_() for name in ("d", "h", "theta")}

    def params(**bases):
        return PhaseNeuronParams(tau=taus, genotype=genotypes, **bases)

    def current():
        return {name: 1 + torch.exp(p) for name, p in raw.items()}

    def spike_mse(bases):
        neuron = params(**bases)
        slope = cfg.surrogate_beta / step_schedule(neuron)[2].detach()
        fire = lambda r, threshold, t: _SurrogateSpike.apply(r, threshold, slope[..., t, None])  # noqa: E731
        return (phase_quantize(magnitude, neuron, fire) - magnitude).square().mean(-1)

    with torch.no_grad():
        scale = spike_mse(current()).clamp(min=torch.finfo(torch.float32).tiny)
        best_mse = torch.full_like(scale, float("inf"))
        best = {name: b.clone() for name, b in current().items()}

    def track(mse, bases):
        nonlocal best_mse
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        for name in best:
            best[name] = torch.where(better[..., None], bases[name].detach(), best[name])

    hw = torch.optim.Adam([raw["h"], raw["theta"]], lr=cfg.lr_hw)
    base = torch.optim.Adam([raw["d"]], lr=cfg.lr_base)
    total, done = cfg.rounds * (cfg.hw_steps + cfg.base_steps), 0
    for _ in range(cfg.rounds):
        for _ in range(cfg.hw_steps):
            bases = current()
            bases["d"] = bases["d"].detach()
            mse = spike_mse(bases)
            track(mse.detach().double(), bases)
            hw.zero_grad()
            (mse / scale).sum().backward()
            hw.step()
            done += 1
            if progress:
                progress(done, total)
        with torch.no_grad():
            quadratic = _spike_moments(magnitude, params(**current()))
        for _ in range(cfg.base_steps):
            bases = {name: b.detach() if name != "d" else b for name, b in current().items()}
            weights = step_schedule(params(**bases))[0].double()
            mse = quadratic(weights)
            track(mse.detach(), bases)
            base.zero_grad()
            (mse / scale).sum().backward()
            base.step()
            done += 1
            if progress:
                progress(done, total)
    with torch.no_grad():
        bases = current()
        track(spike_mse(bases).double(), bases)
    return params(**best)


def _spike_moments(magnitude: Tensor, neuron: PhaseNeuronParams) -> Callable[[Tensor], Tensor]:
    """With spikes fixed, MSE(w) = c − 2·bᵀw + wᵀ·A·w for step weights w [*B, T] (float64)."""
    nonzero = (magnitude > 0).to(magnitude.dtype)
    spikes = torch.stack([s * nonzero for s in magnitude_spikes(magnitude, neuron)], dim=-2)
    count = magnitude.shape[-1]
    # 0/1 products summed in float32 are exact integers below 2^24 samples.
    second = (spikes @ spikes.transpose(-1, -2)).double() / count
    first = (spikes.double() @ magnitude.double().unsqueeze(-1)).squeeze(-1) / count
    energy = magnitude.double().square().mean(-1)

    def mse(weights):
        return energy - 2 * (first * weights).sum(-1) + (weights.unsqueeze(-2) @ second @ weights.unsqueeze(-1))[..., 0, 0]

    return mse


def _tau_grid(max_abs: Tensor, cfg: FitConfig) -> Tensor:
    """[S, G] candidate τ = max|x|·2^(-k/q), k = 0..octaves·q (τ = 1 for an all-zero site)."""
    steps = torch.arange(cfg.tau_octaves * cfg.tau_per_octave + 1, dtype=torch.float32, device=max_abs.device)
    peak = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    return peak[:, None] * torch.exp2(-steps / cfg.tau_per_octave)


def _base2_grid_mse(samples: Tensor, grid: Tensor, T: int, chunk_elements: int = 1 << 24) -> Tensor:
    """[S, G] MSE of the base-2 neuron (closed form) at each grid τ, in chunks of the grid to bound memory."""
    per_chunk = max(1, chunk_elements // samples.numel())
    mse = []
    for taus in grid.split(per_chunk, dim=1):
        x = samples[:, None].expand(*taus.shape, samples.shape[-1])
        mse.append((golden_base2(x, taus, T) - x).square().mean(-1))
    return torch.cat(mse, dim=1)


def _candidate_indices(best: Tensor, count: int, grid_size: int) -> Tensor:
    """[S, K] grid indices: best first, then its neighbours alternating smaller and larger τ, kept in the grid."""
    offsets = [0] + [sign * (k // 2 + 1) for k, sign in zip(range(count - 1), [1, -1] * count)]
    indices = (best[:, None] + torch.tensor(offsets, device=best.device)).abs()
    # Near the grid's ends, reflect back inside (a duplicate candidate is harmless, just fitted twice).
    return torch.where(indices < grid_size, indices, 2 * (grid_size - 1) - indices).clamp(0, grid_size - 1)


def _training_subset(samples: Tensor, size: int) -> Tensor:
    """[S, M] every (N/M)-th order statistic of |x|, the maximum included (M = min(size, N))."""
    magnitude = samples.abs().sort(-1).values
    count = magnitude.shape[-1]
    if size >= count:
        return magnitude
    positions = ((torch.arange(size, device=samples.device) + 0.5) * (count / size)).long()
    return magnitude[:, positions]


def _site_genotypes(genotypes: Tensor | None, cfg: FitConfig, sites: int, device) -> Tensor:
    if genotypes is None:
        return even_genotype(cfg.T, cfg.n_grains).to(device).expand(sites, cfg.T).contiguous()
    if tuple(genotypes.shape) != (sites, cfg.T):
        raise ValueError(f"fit_sites: genotypes must be [S, T] = {(sites, cfg.T)}, got {tuple(genotypes.shape)}")
    return genotypes.to(device=device, dtype=torch.int64)


def _picker(winner: Tensor) -> Callable[[Tensor], Tensor]:
    """Select, per site, candidate winner[s] of a [S, K, ...] tensor."""
    def pick(values):
        index = winner.reshape(-1, 1, *[1] * (values.ndim - 2)).expand(-1, 1, *values.shape[2:])
        return values.gather(1, index).squeeze(1)
    return pick
