"""Perplexity on token windows (protocol in data.py), for the ANN and the spiking model alike."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .progress import shown


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """The summed NLL of every predicted token of one window: logits [1, L, V] of its [1, L] ids."""
    predicted = logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(predicted, ids[0, 1:].to(predicted.device), reduction="sum"))


def perplexity_of(nll: list[float], windows: list[torch.Tensor]) -> float:
    """exp(mean NLL per predicted token) from each window's summed NLL (window_nll), added in window order."""
    total_nll = 0.0
    for value in nll:
        total_nll += value
    return math.exp(total_nll / sum(ids.shape[1] - 1 for ids in windows))


@torch.inference_mode()
def perplexity(forward, windows: list[torch.Tensor], desc: str = "perplexity", progress: bool = True) -> float:
    """exp(mean NLL of every predicted token over all windows); forward maps [1, L] ids to [1, L, V] logits."""
    nll = [window_nll(forward(ids), ids)
           for ids in tqdm(windows, desc=desc, unit="window", disable=not shown(progress), leave=False)]
    return perplexity_of(nll, windows)
