"""Adaptive granularity allocation (docs/method.md §5, "Algorithm 2"): each site's genotype by a DARTS-style search.

Candidates: every split of the T steps into n contiguous blocks of ≥ min_block steps, grain g owning block g
(T=8: n=2 → 5 candidates, n=3 → 6). Per site, candidate c is a phase neuron with bases of its own
(d, h, θ per grain, b = 1 + e^p, initialised at 2) at the site's real τ. Architecture weights α [S, C],
w = softmax(α), relax the discrete choice; rounds alternate
  - neuron steps on every candidate's bases, α fixed, through fit.py's surrogate spike;
  - α steps (Adam), bases fixed. The spikes are then fixed, so both relaxations below are exact quadratics in w
    over the candidates' output moments A = E[x̂_c·x̂_cᵀ], b = E[x̂_c·|x|], c = E[x²] (computed once per round,
    so the α steps cost nothing).
The genotype is argmax α; the caller fits a fresh neuron with it (fit.fit_sites(genotypes=...)).

Two relaxations (`SearchConfig.relaxation`):
  "loss" (default): the expected loss of a candidate drawn from w,  L(w) = Σ_c w_c·E[(x̂_c − x)²].
      Its minimum over α is one-hot on the best candidate, so argmax α ranks the candidates as the neurons
      that will run alone. The gradient on candidate c's bases is w_c·∇MSE_c, and Adam is (up to its ε)
      invariant to that positive scale: the neuron steps are fit.py's Algorithm 1 on every candidate (h, θ
      through the surrogate, then d on the exact quadratic of fixed spikes, keeping the best bases seen).
  "output": the reference's mixed output,  L(w) = E[(Σ_c w_c·x̂_c − x)²], neuron steps Adam on all bases of the
      mixture. Kept for comparison only: a mixture of C quantizers is a finer quantizer than any of them, so
      the candidates co-adapt to the mixture and argmax α says little about the neuron that runs alone
      (measured from base-2 starts: mixtures at 0.1-0.3x the base-2 MSE whose candidates alone were at 1-12x).
Both relaxations normalise each site's loss by its base-2 MSE at τ, so Adam sees O(1) numbers at any scale.

At base 2 every genotype is the same neuron, so gradient steps from there cannot tell the candidates apart at
first (and Algorithm 1 alone barely moves its bases, fit.py): each candidate starts from fit.py's coupled
search, the distribution-aware start of fit_sites, itself started at base 2 and τ. As in DARTS the bases and
α see different data: the bases train on `search_samples` evenly spaced order statistics of |x| per site
(the largest included: shape and tail at a fraction of the cost), α is scored on all of the site's samples,
which the refit will fit. (Scored on the subset alone, a sparse tail of a few dozen values misranked the
candidates.) The reference search scores every candidate at τ = 1, a bug (data on another scale saturates
or uses a few levels); here each site's search starts from the τ it is given.
"""

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from spikecompile.conversion.fit import (
    _FIELDS,
    BASES,
    FitConfig,
    _algorithm1,
    _chunked,
    _chunked_mse,
    _coupled_search,
    _one_thread,
    _row_chunks,
    _SurrogateSpike,
)
from spikecompile.neuron import PhaseNeuronParams, base2_params, phase_quantize, step_schedule

RELAXATIONS = ("loss", "output")


@dataclass(frozen=True)
class SearchConfig:
    """How to search the genotypes.

    relaxation: "loss" or "output" (module docstring). rounds: alternations of neuron steps and alpha_steps
    Adam steps on α (lr_alpha). neuron_steps: per round, Algorithm 1's h/θ steps and d steps ("loss") or
    Adam steps on the mixture's bases ("output"), at lr_neuron on p (b = 1 + e^p); surrogate_beta: β of
    the spike surrogate in units of 1/θ(t). start_rounds, start_trials: the coupled search every candidate
    starts from. search_samples: order statistics of |x| per site the search runs on; min_block: the fewest
    steps of a grain's block; seed: the coupled search and α's small random start (it breaks ties).
    """

    relaxation: str = "loss"
    rounds: int = 2
    neuron_steps: int = 10
    alpha_steps: int = 25
    lr_neuron: float = 0.003
    lr_alpha: float = 0.1
    surrogate_beta: float = 20.0
    start_rounds: int = 20
    start_trials: int = 8
    search_samples: int = 1024
    min_block: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.relaxation not in RELAXATIONS:
            raise ValueError(f"SearchConfig: relaxation must be one of {RELAXATIONS}, got {self.relaxation!r}")
        counts = {"rounds": self.rounds, "neuron_steps": self.neuron_steps, "alpha_steps": self.alpha_steps,
                      "start_rounds": self.start_rounds}
        if any(not isinstance(value, int) or value < 0 for value in counts.values()):
            raise ValueError(f"SearchConfig: need integers {counts} ≥ 0")
        if min(self.start_trials, self.search_samples, self.min_block) < 1:
            raise ValueError(f"SearchConfig: need start_trials, search_samples, min_block ≥ 1, got "
                             f"{self.start_trials}, {self.search_samples}, {self.min_block}")
        if min(self.lr_neuron, self.lr_alpha, self.surrogate_beta) <= 0:
            raise ValueError("SearchConfig: lr_neuron, lr_alpha and surrogate_beta must be > 0")

    def fit_config(self, T: int, n: int) -> FitConfig:
        """The FitConfig of one round of candidate training (Algorithm 1) and of the coupled start."""
        return FitConfig(T=T, n_grains=n, rounds=1, hw_steps=self.neuron_steps, base_steps=self.neuron_steps,
                         lr_hw=self.lr_neuron, lr_base=self.lr_neuron, surrogate_beta=self.surrogate_beta,
                         search_rounds=self.start_rounds, search_trials=self.start_trials, seed=self.seed)


def candidate_genotypes(T: int, n: int, min_block: int = 2) -> Tensor:
    """[C, T] int64: every split of T steps into n contiguous blocks of ≥ min_block steps, grain g on block g.

    Block sizes k_1 + … + k_n = T, k_g ≥ min_block: C = binom(T − n·min_block + n − 1, n − 1) candidates, in
    lexicographic order of the sizes (the first grain's block shortest first). n = 1: the one all-zero row.
    """
    if not 1 <= n <= T or min_block < 1:
        raise ValueError(f"candidate_genotypes: need 1 ≤ n ≤ T and min_block ≥ 1, got T={T}, n={n}, "
                         f"min_block={min_block}")
    if n == 1:
        return torch.zeros(1, T, dtype=torch.int64)
    if n * min_block > T:
        raise ValueError(f"candidate_genotypes: T={T} steps cannot hold n={n} blocks of ≥ {min_block} steps")
    # the n − 1 cut points, each ≥ min_block after the previous one and ≥ min_block before T
    slack = T - n * min_block
    grains = torch.arange(n)
    splits = []
    for extra in itertools.combinations_with_replacement(range(slack + 1), n - 1):
        cuts = [min_block * (g + 1) + extra[g] for g in range(n - 1)]
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, T], strict=True)]
        splits.append(torch.repeat_interleave(grains, torch.tensor(sizes)))
    return torch.stack(splits)


def block_lengths(genotype: Tensor) -> list[int]:
    """The number of steps of each grain's block, e.g. [0, 0, 1, 1, 1] → [2, 3]."""
    return torch.bincount(genotype, minlength=int(genotype.max()) + 1).tolist()


def representative_samples(samples: Tensor, count: int) -> Tensor:
    """[S, min(count, N)] evenly spaced order statistics of |samples| [S, N], the smallest and largest included."""
    magnitude = samples.abs().to(torch.float32).sort(-1).values
    if count >= magnitude.shape[-1]:
        return magnitude
    ranks = torch.linspace(0, magnitude.shape[-1] - 1, count, device=samples.device).round().long()
    return magnitude[:, ranks]


@_one_thread()
def search_genotypes(samples: Tensor, tau: Tensor, T: int, n: int,
                     cfg: SearchConfig = SearchConfig()) -> tuple[Tensor, Tensor, Tensor]:
    """Search one genotype per row of samples [S, N], each site at its scale tau [S] (module docstring).

    Returns (genotypes [S, T], weights [S, C] = softmax(α) at the end, candidates [C, T]) with
    genotypes[s] = candidates[weights[s].argmax()]. Deterministic for a cfg; runs on one torch thread.
    """
    samples = samples.to(torch.float32)
    tau = torch.as_tensor(tau, dtype=torch.float32, device=samples.device)
    if samples.ndim != 2 or samples.numel() == 0 or tuple(tau.shape) != (samples.shape[0],):
        raise ValueError(f"search_genotypes: need samples [S, N] with S, N ≥ 1 and tau [S], got "
                         f"{tuple(samples.shape)} and {tuple(tau.shape)}")
    if not bool(torch.isfinite(samples).all() and torch.isfinite(tau).all() and (tau > 0).all()):
        raise ValueError("search_genotypes: samples must be finite and tau finite and > 0")
    candidates = candidate_genotypes(T, n, cfg.min_block).to(samples.device)
    generator = torch.Generator(device=samples.device).manual_seed(cfg.seed)
    alpha = 1e-3 * torch.randn(samples.shape[0], len(candidates), generator=generator, device=samples.device)
    if len(candidates) > 1:
        alpha = _search(representative_samples(samples, cfg.search_samples), samples.abs(), tau, candidates, alpha, cfg)
    weights = torch.softmax(alpha, dim=-1)
    return candidates[weights.argmax(-1)], weights, candidates


def _search(train: Tensor, magnitude: Tensor, tau: Tensor, candidates: Tensor, alpha: Tensor,
            cfg: SearchConfig) -> Tensor:
    """The alternating search from α [S, C]: bases trained on train [S, M], α on every sample magnitude [S, N]."""
    sites, count = len(magnitude), len(candidates)
    fit_cfg = cfg.fit_config(candidates.shape[1], int(candidates.max()) + 1)
    # candidate c of site s is row s·C + c of every flat [S·C] tensor
    flat_train = train.repeat_interleave(count, 0)
    neurons = _coupled_search(flat_train, tau.repeat_interleave(count), candidates.repeat(sites, 1), fit_cfg)
    scale = _chunked_mse(magnitude, base2_params(tau, fit_cfg.T, fit_cfg.n_grains)).double()
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    alpha = alpha.clone().requires_grad_()
    optimizer = torch.optim.Adam([alpha], lr=cfg.lr_alpha)
    for _ in range(cfg.rounds):
        if cfg.relaxation == "loss":
            neurons = _algorithm1(flat_train, neurons, fit_cfg, None)
        else:
            weights = torch.softmax(alpha.detach(), -1)
            neurons = _flat(_train_mixture(train, _per_site(neurons, sites), weights, scale, cfg))
        moments = _output_moments(magnitude, _per_site(neurons, sites))
        for _ in range(cfg.alpha_steps):
            optimizer.zero_grad()
            (relaxed_loss(moments, torch.softmax(alpha, -1), cfg.relaxation) / scale).sum().backward()
            optimizer.step()
    return alpha.detach()


def relaxed_loss(moments: tuple[Tensor, Tensor, Tensor], weights: Tensor, relaxation: str) -> Tensor:
    """[S] relaxed loss for weights [S, C] from the output moments (A [S, C, C], b [S, C], c [S]):

        "loss":    Σ_c w_c·(A_cc − 2·b_c + c)      (each candidate's own MSE, weighted)
        "output":  wᵀ·A·w − 2·bᵀ·w + c             (the MSE of the mixed output Σ_c w_c·x̂_c)
    """
    second, first, energy = moments
    weights = weights.to(second.dtype)
    if relaxation == "loss":
        return (weights * (second.diagonal(dim1=-2, dim2=-1) - 2 * first)).sum(-1) + energy
    return (weights.unsqueeze(-2) @ second @ weights.unsqueeze(-1))[:, 0, 0] - 2 * (first * weights).sum(-1) + energy


def _output_moments(magnitude: Tensor, neurons: PhaseNeuronParams) -> tuple[Tensor, Tensor, Tensor]:
    """(A [S, C, C], b [S, C], c [S]) in float64 of the candidates' decoded x̂_c on magnitude [S, M]."""
    count = neurons.batch_shape[1]

    def moments(values, chunk):
        output = phase_quantize(values[:, None].expand(-1, count, -1), chunk).double()
        second = (output @ output.transpose(-1, -2)).flatten(1)
        first = (output @ values.double().unsqueeze(-1)).squeeze(-1)
        return torch.cat([second, first, values.double().square().sum(-1, keepdim=True)], 1) / values.shape[-1]

    with torch.no_grad():
        stats = _chunked(moments, (len(magnitude),), count * magnitude.shape[-1], magnitude, neurons)
    return stats[:, :count * count].view(-1, count, count), stats[:, count * count:-1], stats[:, -1]


def _train_mixture(magnitude: Tensor, neurons: PhaseNeuronParams, weights: Tensor, scale: Tensor,
                   cfg: SearchConfig) -> PhaseNeuronParams:
    """neuron_steps Adam steps on every base of neurons [S, C], loss E[(Σ_c w_c·x̂_c − x)²] / scale."""
    raw = {name: torch.log(getattr(neurons, name) - 1).requires_grad_() for name in BASES}
    optimizer = torch.optim.Adam(list(raw.values()), lr=cfg.lr_neuron)
    count = neurons.batch_shape[1]
    for _ in range(cfg.neuron_steps):
        optimizer.zero_grad()
        for rows in _row_chunks((len(magnitude),), count * magnitude.shape[-1]):
            chunk = PhaseNeuronParams(**{**{name: getattr(neurons, name)[rows] for name in _FIELDS},
                                         **{name: 1 + torch.exp(raw[name][rows]) for name in BASES}},
                                      signed_digits=neurons.signed_digits)
            output = _surrogate_output(magnitude[rows][:, None].expand(-1, count, -1), chunk, cfg.surrogate_beta)
            mixed = (weights[rows].unsqueeze(-1) * output).sum(1)
            ((mixed - magnitude[rows]).square().mean(-1) / scale[rows]).sum().backward()
        optimizer.step()
    return PhaseNeuronParams(**{**{name: getattr(neurons, name) for name in _FIELDS},
                                **{name: 1 + torch.exp(raw[name].detach()) for name in BASES}},
                             signed_digits=neurons.signed_digits)


def _surrogate_output(magnitude: Tensor, neurons: PhaseNeuronParams, beta: float) -> Tensor:
    """The decoded magnitudes of neurons [*B] on magnitude [*B, M], differentiable through the surrogate spike
    (slope β/θ(t), as fit.py's Algorithm 1)."""
    slope = (beta / step_schedule(neurons)[2].detach()).unsqueeze(-1)

    def fire(residual, threshold, t):
        return _SurrogateSpike.apply(residual, threshold, slope[..., t, :])

    return phase_quantize(magnitude, neurons, fire)


def _per_site(neurons: PhaseNeuronParams, sites: int) -> PhaseNeuronParams:
    """Flat neurons [S·C] as [S, C]."""
    return PhaseNeuronParams(**{name: getattr(neurons, name).unflatten(0, (sites, -1)) for name in _FIELDS},
                             signed_digits=neurons.signed_digits)


def _flat(neurons: PhaseNeuronParams) -> PhaseNeuronParams:
    """Neurons [S, C] as [S·C]."""
    return PhaseNeuronParams(**{name: getattr(neurons, name).flatten(0, 1) for name in _FIELDS},
                             signed_digits=neurons.signed_digits)
