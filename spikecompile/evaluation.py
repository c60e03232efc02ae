"""Perplexity on token windows (protocol in data.py), for the ANN and the spiking model alike."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.inference_mode()
def perplexity(forward, windows: list[torch.Tensor], desc: str = "perplexity", progress: bool = True) -> float:
    """exp(mean NLL of every predicted token over all windows); forward maps [1, L] ids to [1, L, V] logits."""
    total_nll, total_tokens = 0.0, 0
    for ids in tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False):
        logits = forward(ids)[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:].to(logits.device), reduction="sum")
        total_nll += float(nll)
        total_tokens += ids.shape[1] - 1
    return math.exp(total_nll / total_tokens)
