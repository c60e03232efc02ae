"""Per-site timestep budgets (issue 16, item 3): each site's T chosen under one global cost budget.

HAWQ-style mixed precision with T in the place of the bit width ("HAWQ-V2", Dong et al., arXiv 1911.03852):

1. Curves. For every site and every T in TIMESTEP_CHOICES, the base-2 neuron at its own error-minimising τ
   (fit.py step 1; the fitted neuron is within about 1 % of it) gives the MSE(T) and the spikes per
   activation(T) on the site's calibration samples (signed digits for phase-sd).
2. Sensitivity. The calibration loss (next-token NLL) grows by about ½·Σ_e H_ee·δ_e² when the site's values
   move by δ. With the empirical Fisher as H's diagonal and quantization noise of variance MSE(T), a site's
   loss change is ½·F_s·MSE_s(T), F_s = Σ_e (∂L/∂x_e)² summed over the calibration windows (``site_fisher``;
   the streamed conversion computes it one decoder layer at a time, backward, with ``site_fisher_part``).
3. Cost. The ledger (spikecompile.budget, from the sim backend's counting code) prices a site's spikes and a
   tie group's steps; sites whose spike trains meet must run one T (passes/timesteps.py), so the unit of the
   choice is a tie group.
4. Greedy. Every group starts at the largest T; the step that lowers the cost most per unit of loss added
   (ΔC/ΔL) is taken until the cost meets the budget (``allocate``). The caller then checks the result on the
   exact ledger and continues down while it does not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..modelschema import TIMESTEP_RANGE
from .fit import FitConfig, _chunked_stats, best_base2
from .sites import SiteTable

TIMESTEP_CHOICES = tuple(range(TIMESTEP_RANGE[0], TIMESTEP_RANGE[1] + 1))
BUDGET_KINDS = {"spikes_per_mac": "--spikes-per-mac", "energy": "--energy-budget"}  # kind: its convert option


@dataclass(frozen=True)
class SiteCurves:
    """Per site (rows) and T (columns, TIMESTEP_CHOICES): the base-2 neuron's MSE and spikes per activation."""

    mse: Tensor
    spikes: Tensor

    def at(self, row: int, steps: int) -> tuple[float, float]:
        column = TIMESTEP_CHOICES.index(steps)
        return float(self.mse[row, column]), float(self.spikes[row, column])


def site_curves(samples: Tensor, grains: int, signed: bool = False) -> SiteCurves:
    """MSE and spikes per activation [S, len(TIMESTEP_CHOICES)] of each site's base-2 neuron at its best τ."""
    samples = samples.to(torch.float32)
    max_abs = samples.abs().amax(-1)
    mse, spikes = [], []
    for steps in TIMESTEP_CHOICES:
        neuron = best_base2(samples, FitConfig(T=steps, n_grains=grains), max_abs=max_abs)
        if signed:
            neuron = replace(neuron, signed_digits=True)
        stats = _chunked_stats(samples, neuron)
        mse.append(stats[:, 0])
        spikes.append(stats[:, 1])
    return SiteCurves(mse=torch.stack(mse, 1).double(), spikes=torch.stack(spikes, 1).double())


def site_fisher(forward: Callable[[Tensor], Tensor], sites: SiteTable, embedding: torch.nn.Module,
                windows: Sequence[Tensor]) -> Tensor:
    """[S] F_s = Σ (∂L/∂x)² over every element of site s's activation and every window, sites off, with L the
    window's mean next-token NLL under forward(ids) -> logits, on a whole model in memory. Only activations get
    gradients (the embedding output is made a leaf), no weight does. The conversion streams the model and uses
    site_fisher_part, part by part, instead; this is its reference (tests/test_budget.py)."""
    totals = torch.zeros(len(sites), dtype=torch.float64)
    handles = [embedding.register_forward_hook(lambda module, args, output: output.detach().requires_grad_())]
    handles += _watch_sites(sites, totals, 0)
    try:
        with torch.enable_grad():
            for ids in windows:
                next_token_loss(forward(ids), ids).backward()
    finally:
        for handle in handles:
            handle.remove()
    return totals


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """A window's mean next-token NLL (the calibration loss whose gradients give the Fisher)."""
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device))


def site_fisher_part(forward: Callable[[int, Tensor], Tensor], sites: SiteTable, inputs: Sequence[Tensor],
                     totals: Tensor, first: int, upstream: Sequence[Tensor] | None = None) -> list[Tensor]:
    """site_fisher over one part of a model run part by part, backward from the last part (per-layer gradient
    checkpointing): the part is run again on each window's saved input, with gradients, and back-propagated.

    forward(k, x): the part on window k's input x (a leaf): its output, or for the last part the window's loss
    (next_token_loss); upstream[k]: ∂L_k/∂(that output), from the part after it. Adds each of `sites`' Σ(∂L/∂x)²
    to totals[first + i] (i: its place in `sites`) and returns ∂L_k/∂x per window, the upstream of the part
    before. The chain rule makes the sum over parts site_fisher's (up to the order of float additions)."""
    handles = _watch_sites(sites, totals, first)
    gradients = []
    try:
        with torch.enable_grad():
            for k, hidden in enumerate(inputs):
                leaf = hidden.detach().requires_grad_()
                forward(k, leaf).backward(None if upstream is None else upstream[k])
                gradients.append(leaf.grad)
    finally:
        for handle in handles:
            handle.remove()
    return gradients


def _watch_sites(sites: SiteTable, totals: Tensor, first: int) -> list:
    """Forward hooks that add Σ grad² of each site's output to totals[first + its index] when it is back-propagated."""

    def watch(index):
        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(lambda grad: totals.__setitem__(index, totals[index] + grad.double().square().sum()))
        return hook

    return [site.register_forward_hook(watch(first + index)) for index, site in enumerate(sites.values())]


@dataclass(frozen=True)
class LinearCost:
    """The ledger's cost, linear in each site's spikes per activation and each tie group's T:

    cost = constant + Σ_s per_spike[s]·spikes_s + Σ_g per_step[g]·T_g   (in the budget's unit)."""

    per_spike: dict[str, float]
    per_step: list[float]
    constant: float = 0.0


def allocate(names: Sequence[str], groups: Sequence[Sequence[str]], curves: SiteCurves, fisher: Tensor,
             cost: LinearCost, budget: float, start: dict[str, int] | None = None) -> dict[str, int]:
    """{site: T}: greedy from `start` (default: the largest T everywhere), lowering one group's T at a time, the
    step with the most cost saved per loss added first, until the linear cost meets `budget`. Raises ValueError
    when even T = TIMESTEP_CHOICES[0] everywhere costs more than the budget (message: that cost)."""
    row = {name: index for index, name in enumerate(names)}
    group_of = [list(group) for group in groups]

    def group_cost(index: int, steps: int) -> float:
        spikes = sum(cost.per_spike[site] * curves.at(row[site], steps)[1] for site in group_of[index])
        return spikes + cost.per_step[index] * steps

    def group_loss(index: int, steps: int) -> float:
        return sum(0.5 * float(fisher[row[site]]) * curves.at(row[site], steps)[0] for site in group_of[index])

    lowest = TIMESTEP_CHOICES[0]
    floor = cost.constant + sum(group_cost(index, lowest) for index in range(len(group_of)))
    if floor > budget:
        raise ValueError(f"{floor:.6g}")
    chosen = [(start or {}).get(group[0], TIMESTEP_CHOICES[-1]) for group in group_of]
    total = cost.constant + sum(group_cost(index, steps) for index, steps in enumerate(chosen))
    while total > budget:
        best, best_score = None, None
        for index, steps in enumerate(chosen):
            for lower in range(lowest, steps):  # any lower T: the curves need not be convex
                saved = group_cost(index, steps) - group_cost(index, lower)
                if saved <= 0:
                    continue
                added = max(group_loss(index, lower) - group_loss(index, steps), 0.0)
                score = added / saved
                if best_score is None or score < best_score:
                    best, best_score = (index, lower), score
        if best is None:  # nothing saves cost: every group already at its cheapest
            break
        index, lower = best
        total -= group_cost(index, chosen[index]) - group_cost(index, lower)
        chosen[index] = lower
    return {site: chosen[index] for index, group in enumerate(group_of) for site in group}
