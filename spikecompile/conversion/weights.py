"""RTN weight quantization (SDLLM's 4/6-bit weights; docs/method.md §8), applied after the rotation.

Every Linear weight inside the decoder layers (q, k, v, o, gate, up, down) is rounded to nearest on a symmetric
per-output-channel grid: s_r = max_j |W_rj| / (2^(b−1) − 1), W_rj ← s_r·clamp(round(W_rj / s_r), ±(2^(b−1) − 1)).
Embeddings and lm_head stay float. Applied to the rotated weights (the basis the spikes see), deterministic,
so model.pt records only the method and re-applies it on load.
"""

from __future__ import annotations

import torch

LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@torch.no_grad()
def rtn_quantize_weights(model, bits: int) -> dict:
    """Quantize the decoder layers' Linear weights in place; returns the record model.pt keeps."""
    for layer in model.model.layers:
        rtn_quantize_layer(layer, bits)
    return rtn_record(bits, len(model.model.layers))


@torch.no_grad()
def rtn_quantize_layer(layer, bits: int) -> None:
    """Quantize one decoder layer's Linear weights (LAYER_LINEARS) in place."""
    top = 2 ** (bits - 1) - 1
    for path in LAYER_LINEARS:
        weight = layer.get_submodule(path).weight
        scale = weight.abs().amax(dim=1, keepdim=True) / top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        weight.copy_(torch.round(weight / scale).clamp(-top, top) * scale)


def rtn_record(bits: int, layers: int) -> dict:
    """The record model.pt keeps of the weights of `layers` decoder layers quantized to `bits`."""
    return {"method": "rtn", "bits": bits, "grid": "symmetric, per output channel",
            "linears": layers * len(LAYER_LINEARS)}
