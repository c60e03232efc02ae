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
    top = 2 ** (bits - 1) - 1
    count = 0
    for layer in model.model.layers:
        for path in LAYER_LINEARS:
            linear = layer.get_submodule(path)
            weight = linear.weight
            scale = weight.abs().amax(dim=1, keepdim=True) / top
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            weight.copy_(torch.round(weight / scale).clamp(-top, top) * scale)
            count += 1
    return {"method": "rtn", "bits": bits, "grid": "symmetric, per output channel", "linears": count}
