"""Spike sites: where phase neurons sit in a transformers LLaMA model (docs/method.md §2, reference placement).

Nine sites per decoder layer plus the final norm, installed with forward hooks and one registered attention
function, so transformers' own modules run unchanged:

    attn_norm    input_layernorm output (feeds q/k/v)        forward hook
    q, k         post-RoPE query / key (k before the GQA repeat: the neuron is elementwise, so
                 quantize(repeat(k)) == repeat(quantize(k)) exactly)  attention function
    v            value                                         attention function
    attn_probs   softmax probabilities                         attention function
    o_proj_in    o_proj input (attention output)               forward pre-hook
    mlp_norm     post_attention_layernorm output (feeds gate/up)   forward hook
    silu         SiLU(gate) (the MLP product is spikes(SiLU) ⊙ real up)   forward hook on act_fn
    down_proj_in down_proj input, after the online Hadamard if the model is rotated   forward pre-hook
    final_norm   model.norm output (feeds lm_head)             forward hook

Not spiked (as in the reference): embedding, residual stream, up_proj output, pre-softmax scores.
With every site `off` the model computes exactly what transformers' eager attention computes.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import SpikecompileError
from ..ir.neurons import LAYER_SITE_KINDS
from ..neuron import PhaseNeuronParams, phase_quantize

ATTENTION_IMPLEMENTATION = "spikecompile"
MODES = ("off", "calibrate", "decoded")


class SpikeSite(nn.Module):
    """One spike site: the same phase neuron applied to every element of one activation tensor.

    Modes: `off` (identity), `calibrate` (identity; records a deterministic random subset of the values and
    fails on NaN/inf), `decoded` (x ↦ x̂, the phase neuron's decoded output).
    """

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.mode = "off"
        self.neuron: PhaseNeuronParams | None = None
        self.recorder: SampleRecorder | None = None
        self.per_token_steps: int | None = None
        """sdllm with per-token scales: its T (conversion.codings.sdllm_per_token); None: the fitted neuron."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "decoded" and self.per_token_steps is not None:
            from .codings import sdllm_per_token

            return sdllm_per_token(x.float(), self.per_token_steps).to(x.dtype)
        if self.mode == "decoded":  # the neuron runs in fp32 whatever the model's dtype (a no-op cast in fp32)
            return phase_quantize(x.float(), self.neuron).to(x.dtype)
        if self.mode == "calibrate":
            self.recorder.record(self.name, x)
        return x

    def extra_repr(self) -> str:
        return f"{self.name}, mode={self.mode}"


class SampleRecorder:
    """Deterministic down-sampling of one site's activations during calibration.

    Each forward call contributes its largest-|x| value plus `per_call − 1` values drawn uniformly with a
    site-specific seeded generator, so the sample depends only on the seed, the site and the calibration
    tokens. The largest values are kept on purpose: τ is chosen by the error on these samples, and an
    extreme that a uniform draw misses would be clipped at inference without the fit ever seeing it.
    """

    def __init__(self, per_call: int, seed: int, skipped_calls: int = 0):
        self.per_call = per_call
        self.generator = torch.Generator().manual_seed(seed)
        self.chunks: list[torch.Tensor] = []
        self.skipped_calls = skipped_calls
        """calls of earlier windows that another process records (data parallelism, spikecompile.parallel): their
        draws are made and dropped before the first call here, so this process's draws are the one process's"""

    def record(self, site_name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        peak = flat.abs().argmax()  # a NaN wins argmax (torch propagates it), else an inf: one check covers all
        if not torch.isfinite(flat[peak]):
            raise SpikecompileError(
                f"site {site_name}: NaN/inf activations during calibration; check the model weights "
                f"or the calibration text"
            )
        for _ in range(self.skipped_calls):  # every window has the same length: the same draw each
            torch.randint(flat.numel(), (self.per_call - 1,), generator=self.generator)
        self.skipped_calls = 0
        index = torch.randint(flat.numel(), (self.per_call - 1,), generator=self.generator).to(flat.device)
        self.chunks.append(torch.cat([flat[peak].reshape(1), flat[index]]).cpu())

    def samples(self) -> torch.Tensor:
        return torch.cat(self.chunks)


class SiteTable(dict):
    """name -> SpikeSite, in model order (layer by layer, LAYER_SITE_KINDS order, then final_norm)."""

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown site mode {mode!r}; expected one of {MODES}")
        for site in self.values():
            if mode == "decoded" and site.neuron is None:
                raise SpikecompileError(f"site {site.name}: no fitted neuron; convert the model first")
            site.mode = mode

    @contextlib.contextmanager
    def all_off(self):
        """Run the float model inside the block; every site gets its mode back afterwards."""
        modes = {name: site.mode for name, site in self.items()}
        self.set_mode("off")
        try:
            yield
        finally:
            for name, mode in modes.items():
                self[name].mode = mode


def site_name(layer: int | None, kind: str) -> str:
    return "final_norm" if layer is None else f"layers.{layer}.{kind}"


def spiking_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with spike sites on q, k, v and the softmax probabilities.

    Same operation order as transformers' eager attention, so with the sites off the result is bitwise equal.
    """
    from transformers.models.llama.modeling_llama import repeat_kv

    sites = module.spike_sites
    query, key, value = sites["q"](query), sites["k"](key), sites["v"](value)
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = sites["attn_probs"](probs)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def register_attention_implementation() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, spiking_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, eager_mask)


def _output_hook(site: SpikeSite):
    return lambda module, inputs, output: site(output)


def _input_hook(site: SpikeSite):
    return lambda module, inputs: (site(inputs[0]), *inputs[1:])


def install_layer_sites(layer, index: int) -> SiteTable:
    """Install decoder layer `index`'s nine spike sites on it (in place; all `off`), in LAYER_SITE_KINDS order.

    Call after any rotation of the layer, so the down_proj site's pre-hook runs after the online Hadamard's.
    The attention function the q/k/v/attn_probs sites need is registered here; the model's config must name it
    (config._attn_implementation = ATTENTION_IMPLEMENTATION), as install_sites does."""
    register_attention_implementation()
    sites = SiteTable((kind, SpikeSite(site_name(index, kind))) for kind in LAYER_SITE_KINDS)
    attention, mlp = layer.self_attn, layer.mlp
    attention.spike_sites = nn.ModuleDict({kind: sites[kind] for kind in ("q", "k", "v", "attn_probs")})
    layer.input_layernorm.register_forward_hook(_output_hook(sites["attn_norm"]))
    layer.post_attention_layernorm.register_forward_hook(_output_hook(sites["mlp_norm"]))
    attention.o_proj.register_forward_pre_hook(_input_hook(sites["o_proj_in"]))
    mlp.down_proj.register_forward_pre_hook(_input_hook(sites["down_proj_in"]))
    mlp.act_fn.register_forward_hook(_output_hook(sites["silu"]))
    return SiteTable((site.name, site) for site in sites.values())


def install_sites(model) -> SiteTable:
    """Install the reference spike sites on a transformers LLaMA model (in place); all start `off`.

    Call after any rotation, so the down_proj site's pre-hook runs after the online Hadamard's.
    """
    if getattr(model, "spike_sites", None) is not None:
        raise SpikecompileError("spike sites are already installed on this model")
    register_attention_implementation()
    table = SiteTable()
    activations_seen = set()
    for index, layer in enumerate(model.model.layers):
        if id(layer.mlp.act_fn) in activations_seen:
            raise SpikecompileError(f"model.layers.{index}.mlp.act_fn is shared between layers; cannot hook it")
        activations_seen.add(id(layer.mlp.act_fn))
        table.update(install_layer_sites(layer, index))
    final = SpikeSite(site_name(None, "final_norm"))
    model.model.norm.register_forward_hook(_output_hook(final))
    table[final.name] = final
    model.config._attn_implementation = ATTENTION_IMPLEMENTATION
    model.spike_sites = table
    return table
