"""Calibration: run the float model on calibration windows and keep a deterministic sample per spike site."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..progress import shown
from .sites import SampleRecorder, SiteTable


@torch.inference_mode()
def collect_samples(forward, sites: SiteTable, windows: list[torch.Tensor], samples_per_site: int, seed: int,
                    progress: bool = True) -> torch.Tensor:
    """Return [S, N] samples in site-table order, N = samples_per_site; each holds its site's largest |x|.

    Each site draws ceil(N / calls) values per forward call with its own seeded generator, where calls is the
    number of windows (the attention sites are called once per layer per window like every other site).
    forward runs one [1, L] window through the model (with the KV prefix, if any).
    """
    per_call = math.ceil(samples_per_site / len(windows))
    for index, site in enumerate(sites.values()):
        site.recorder = SampleRecorder(per_call, seed=seed * 100_003 + index)
    sites.set_mode("calibrate")
    try:
        for ids in tqdm(windows, desc="calibrate", unit="window", disable=not shown(progress)):
            forward(ids)
    finally:
        sites.set_mode("off")
    samples = torch.stack([site.recorder.samples()[:samples_per_site] for site in sites.values()])
    for site in sites.values():
        site.recorder = None
    return samples
