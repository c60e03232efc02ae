"""The coding zoo: every coding is the one neuron of neuron.py with its own parameters (docs/method.md §1, §8).

With m = |x|, σ = sign(x), step weights d(t), thresholds θ(t), resets h(t), initial potential v0 and spike
budget K (neuron.py), each coding fixes:

    phase       fitted bases d, h, θ per grain (fit.py, Algorithm 1), v0 = ½·τ·2^-T, K = 0      (SpikingLLM)
    phase-sd    phase with signed digits (neuron/reference.py): s_t ∈ {−1, 0, +1}, thresholds (2θ(t) ± v0)/3;
                with every base 2 a nearest-level quantizer in non-adjacent form (golden_signed_base2)
    las         every base 2, v0 = ½·τ·2^-T, K = 0: x̂ = σ·Δ·clamp(⌈m/Δ − ½⌉, 0, 2^T − 1), Δ = τ·2^-T
    spikedattn  las with K = 2: the first two spikes of the base-2 code (SpikedAttention-style)
    ttfs        las with K = 1: one spike, at the first step t with m + v0 > τ·2^-(t+1), read as τ·2^-(t+1)
                (time-to-first-spike with an exponentially decaying kernel: a log-domain quantizer)
    rate        bases 1 (d = h = θ = τ), v0 = τ/2, K = 0: x̂ = σ·τ·clamp(⌈m/τ − ½⌉, 0, T), T + 1 levels,
                the spike count is the value
    sdllm       rate over D = T = 2^(b−1) steps with K = 2^(b−1) − 1 and v0 = τ/2 − c (docs/method.md §8): a
                symmetric b-bit integer count c_x = clamp(⌈(m − c)/τ − ½⌉, 0, K), unfolded into |c_x| ternary
                spikes σ·s_t; c ≥ 0 is the membrane clipping (0: plain round to nearest)

sdllm with --sdllm-scales per-token (SDLLM's and QuaRot's min-max scales): τ is not a site constant but each
token's own, computed at run time: τ_row = max|x_row| / K over the last dim (a token's features; per head and
token for q, k, v; per query row for the softmax probabilities), then the sdllm neuron at τ = 1 runs on x / τ_row
and its output is scaled back by τ_row (sdllm_per_token). In the IR it is the PhaseNeuron's token_levels (L = K): the
simulator and ONNX run it, the ledger counts the max, the divide and the rescale, NIR runs such neurons from their
IR records, and Lava and the Loihi 2 mapping refuse it, naming the site and the option.

τ is chosen per site by the error on its calibration samples (a grid search on the closed forms above, the
same grid as the base-2 baseline), never by the raw maximum. The closed forms are used only to search;
the fitted neuron's reported MSE is the real neuron's.

Lowering: every coding is the IR's one PhaseNeuron node (fields v0, max_spikes, signed_digits), so every backend
lowers all of them exactly (but per-token scales, above):
    sim    the same neuron (decoded and event mode); a spike costs the same in every coding
    NIR    stock Threshold/Scale nodes over two sign channels: 10T + 2 nodes, 18T − 6K − 2 with a budget
           1 ≤ K < T (a running spike count and a Threshold gate ANDed into every step t ≥ K)
    Lava   the phase-neuron Process (floating_pt, fixed_pt): its per-neuron spike counter enforces K, v0 is
           its starting potential (thresholds θ(t) − v0 may be negative)
    ONNX   Greater/And(Less(count, K)) per step, bitwise equal to the simulator
    Loihi 2 mapping: a ⌈log2(K + 1)⌉-bit counter per neuron, and the potential range v0 implies
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..modelschema import CODINGS, SDLLM_COUNT_BITS, SIGNED_CODINGS, sdllm_steps  # the names model.pt may hold: its schema's
from ..neuron import PhaseNeuronParams, base2_params, even_genotype

__all__ = ["CODINGS", "SIGNED_CODINGS", "SDLLM_COUNT_BITS", "BUDGETS", "sdllm_steps", "coding_params", "closed_form", "sdllm_clip",
           "SDLLM_SCALES", "sdllm_per_token", "sdllm_unit"]
BUDGETS = {"spikedattn": 2, "ttfs": 1}
SDLLM_SCALES = ("static", "per-token")
"""--sdllm-scales: one τ per site fitted on calibration samples, or each token's min-max τ at run time."""


def coding_params(coding: str, tau: Tensor, T: int, n_grains: int = 1, clip: Tensor | None = None,
                  genotype: Tensor | None = None) -> PhaseNeuronParams:
    """The neurons [*B] of a fixed (unfitted) coding at scale τ [*B]; clip c [*B] for sdllm only."""
    if coding in ("las", "spikedattn", "ttfs"):
        params = base2_params(tau, T, n_grains, genotype)
        if coding == "las":
            return params
        return dataclasses.replace(params, max_spikes=torch.full_like(params.max_spikes, BUDGETS[coding]))
    if coding in ("rate", "sdllm"):
        tau = torch.as_tensor(tau, dtype=torch.float32)
        genotype = even_genotype(T, 1).to(tau.device).expand(*tau.shape, T).contiguous()
        ones = torch.ones(*tau.shape, 1, dtype=tau.dtype, device=tau.device)
        clip = torch.zeros_like(tau) if clip is None else clip.to(tau)
        budget = T - 1 if coding == "sdllm" else 0
        return PhaseNeuronParams(tau=tau, genotype=genotype, d=ones, h=ones.clone(), theta=ones.clone(),
                                 v0=tau / 2 - clip, max_spikes=torch.full(tau.shape, budget, dtype=torch.int64))
    raise ValueError(f"coding_params: {coding!r} is not a fixed coding ({', '.join(CODINGS[1:])})")


def closed_form(coding: str, magnitude: Tensor, tau: Tensor, T: int, clip: Tensor | None = None) -> Tensor:
    """x̂ ≥ 0 of the coding for magnitudes [..., N] at τ [...] (clip [...] for sdllm), in closed form.

    Equal to the neuron up to float rounding at the decision points; used to search τ only.
    """
    tau = tau.unsqueeze(-1)
    if coding in ("rate", "sdllm"):
        shift = 0.0 if clip is None else clip.unsqueeze(-1)
        top = T - 1 if coding == "sdllm" else T
        return torch.ceil((magnitude - shift) / tau - 0.5).clamp(0, top) * tau
    step = tau * 2.0 ** -T
    level = torch.ceil(magnitude / step - 0.5).clamp(0, 2**T - 1)
    budget = BUDGETS.get(coding)
    if budget is None:
        return level * step
    kept = torch.zeros_like(level)
    for _ in range(budget):  # greedy base 2 fires the set bits of the rounded level, highest first
        _, exponent = torch.frexp(level)
        top = torch.where(level > 0, torch.ldexp(torch.ones_like(level), exponent - 1), 0.0)
        kept, level = kept + top, level - top
    return kept * step


def sdllm_clip(magnitude: Tensor, tau: Tensor, zero_share: float) -> Tensor:
    """Membrane clipping c [...] per site: the smallest c ≥ 0 that sends at least `zero_share` of the
    samples [..., N] to a zero count (zero iff m ≤ τ/2 + c)."""
    if zero_share <= 0:
        return torch.zeros_like(tau)
    quantile = torch.quantile(magnitude.float(), zero_share, dim=-1)
    return (quantile - tau / 2).clamp(min=0)


def sdllm_per_token(x: Tensor, T: int) -> Tensor:
    """x̂ of sdllm with per-token min-max scales: τ_row = max|x_row| / K (K = T − 1, the b-bit count's top) over
    the last dim, x̂ = τ_row · neuron(x / τ_row) with the sdllm neuron at τ = 1 (a row of zeros stays zero)."""
    from ..neuron import phase_quantize, token_scales

    scale = token_scales(x, T - 1)
    return phase_quantize(x / scale, sdllm_unit(T, x.device)) * scale


def sdllm_unit(T: int, device=None) -> PhaseNeuronParams:
    """The sdllm neuron at τ = 1 that per-token scales run (on x / τ_row)."""
    return coding_params("sdllm", torch.tensor(1.0, device=device), T)
