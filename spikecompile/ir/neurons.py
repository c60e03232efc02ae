"""Spiking nodes: the phase neuron of one spike site (docs/method.md §1; spikecompile.neuron is its reference code)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..errors import SpikecompileError
from ..neuron import PhaseNeuronParams, initial_potential
from .base import IRNode, TensorType, is_count, node_type, require

LAYER_SITE_KINDS = ("attn_norm", "q", "k", "v", "attn_probs", "o_proj_in", "mlp_norm", "silu", "down_proj_in")
"""The spike sites of one decoder layer, in model order (conversion.sites places them)."""
SITE_KINDS = (*LAYER_SITE_KINDS, "final_norm")
"""Every site kind: the last part of a site name ("layers.3.q", "final_norm")."""


@node_type
class PhaseNeuron(IRNode):
    """The phase neuron of one spike site, the same neuron for every element of x (output shaped like x).

    With T = timesteps, g = genotype, n grains and t = 0..T−1:
        d(t) = τ·d[g(t)]^-(t+1)    h(t) = τ·h[g(t)]^-(t+1)    θ(t) = τ·θ[g(t)]^-(t+1)
        σ = sign(x);  v = |x| + v0;  s_t = [v > θ(t)] ∧ [K = 0 ∨ Σ_{u<t} s_u < K];  v ← v − h(t)·s_t
        decoded:  x̂ = σ·Σ_t d(t)·s_t
    (v0 = ½·τ·2^-T and K = 0 for the phase coding; conversion.codings gives the others.)
    Signed digits (signed_digits, the phase-sd coding): the potential keeps its sign and s_t ∈ {−1, 0, +1},
        θ_sd(t) = (2·θ(t) + (−1)^(T−t)·v0)/3;  r = x
        s_t = (+1 if r > θ_sd(t), −1 if r < −θ_sd(t), else 0) ∧ [K = 0 ∨ Σ_{u<t} |s_u| < K];  r ← r − h(t)·s_t
        decoded:  x̂ = Σ_t d(t)·s_t      (σ is not used: each step carries its own sign)
    Per-token scales (token_levels L ≥ 1, sdllm with --sdllm-scales per-token): τ is not a constant but each row's
    own, from the input at run time, over the last dim (a token's features; per head for q, k, v; per query for
    the attention probabilities):
        τ_row = max|x_row| / L  (1 for a row of zeros);  x̂ = τ_row · x̂₁(x / τ_row)
    with x̂₁ the neuron above (its own parameters, τ = 1 for sdllm). The max, the divide and the rescale are
    real operations the ledger counts; NIR, which has no reduction over a vector, runs such a neuron from its
    record, and Lava and the Loihi 2 mapping refuse it.
    Events (integrate-then-fire): the neuron integrates its whole input window X = Σ_t x_t, of any number of
    steps, then emits y_t = σ·d(t)·s_t for t = 0..T−1 (signed digits: y_t = d(t)·s_t; per-token scales:
    y_t = τ_row·σ·d(t)·s_t, τ_row from X), so Σ_t y_t = x̂. Every nonzero s_t is one spike (a −1 too), and each
    of its fan-outs one AC.

    site: the spike-site name ("layers.3.q", "final_norm"), its last part the site kind (conversion.sites).
    genotype: int64 [T];  tau: float [];  d, h, theta: float [n] like tau;  v0: float [] like tau;
    max_spikes: the spike budget K (int ≥ 0, 0: none);  signed_digits: bool, the signed-digit neuron above;
    token_levels: L of the per-token scales (int ≥ 0, 0: none, τ is the site's constant).
    """

    integrates_input: ClassVar[bool] = True
    site: str
    timesteps: int
    genotype: Tensor
    tau: Tensor
    d: Tensor
    h: Tensor
    theta: Tensor
    v0: Tensor
    max_spikes: int = 0
    signed_digits: bool = False
    token_levels: int = 0

    @property
    def kind(self) -> str:
        return self.site.rsplit(".", 1)[-1]

    @property
    def has_default_v0(self) -> bool:
        """v0 = ½·τ·2^-T, the phase neuron's (and the base-2 codings')."""
        return bool(torch.equal(self.v0, initial_potential(self.tau, self.timesteps)))

    @property
    def is_phase_coded(self) -> bool:
        """No budget and the default v0: a phase neuron (fitted or base 2), not another coding."""
        return self.max_spikes == 0 and self.has_default_v0 and not self.signed_digits and not self.token_levels

    def params(self) -> PhaseNeuronParams:
        return PhaseNeuronParams(tau=self.tau, genotype=self.genotype, d=self.d, h=self.h, theta=self.theta,
                                 v0=self.v0, max_spikes=torch.tensor(self.max_spikes), signed_digits=self.signed_digits)

    def refuse_token_scales(self, backend: str) -> None:
        """One line naming the site and the option, where `backend` has no run-time max and divide."""
        if self.token_levels:
            raise SpikecompileError(
                f"site {self.site}: {backend} cannot lower per-token scales (--sdllm-scales per-token: each token's "
                f"max and divide at run time); build it with --target sim or onnx, or convert with --sdllm-scales "
                f"static")

    @classmethod
    def from_params(cls, site: str, params: PhaseNeuronParams, token_levels: int = 0) -> PhaseNeuron:
        require(params.batch_shape == (), f"PhaseNeuron: one neuron per site, got batch shape {tuple(params.batch_shape)}")
        return cls(site=site, timesteps=params.T, genotype=params.genotype, tau=params.tau, d=params.d, h=params.h,
                   theta=params.theta, v0=params.v0, max_spikes=int(params.max_spikes),
                   signed_digits=params.signed_digits, token_levels=token_levels)

    def check(self):
        require(isinstance(self.site, str) and self.kind in SITE_KINDS,
                f"site {self.site!r} must end in a site kind, one of {SITE_KINDS}")
        require(all(isinstance(getattr(self, name), Tensor) for name in ("genotype", "tau", "d", "h", "theta", "v0")),
                "genotype, tau, d, h, theta and v0 must be tensors")
        # a budget of T or more never binds (the codings use 1, 2 and T − 1)
        require(is_count(self.timesteps), f"timesteps must be an int ≥ 1, got {self.timesteps!r}")
        require(isinstance(self.signed_digits, bool), f"signed_digits must be a bool, got {self.signed_digits!r}")
        require(is_count(self.token_levels, 0), f"token_levels must be an int ≥ 0, got {self.token_levels!r}")
        require(is_count(self.max_spikes, 0) and self.max_spikes <= self.timesteps,
                f"max_spikes must be an int in 0..timesteps ({self.timesteps!r}), got {self.max_spikes!r}")
        require(self.tau.ndim == 0, f"tau must be a 0-d tensor (one neuron per site), got shape {list(self.tau.shape)}")
        params = self.params()
        require(params.T == self.timesteps, f"genotype has {params.T} steps, timesteps is {self.timesteps!r}")

    def infer(self, inputs):
        x = inputs["x"]
        require(x.is_float, f"input x is {x}, expected a float tensor")
        return x

    @classmethod
    def example(cls):
        params = PhaseNeuronParams(tau=torch.tensor(0.75), genotype=torch.tensor([0, 0, 1, 1]),
                                   d=torch.tensor([2.0, 1.9]), h=torch.tensor([2.1, 2.0]),
                                   theta=torch.tensor([1.95, 2.05]))
        return cls.from_params("layers.0.q", params), {"x": TensorType((2, "seq", 4), "float32")}
