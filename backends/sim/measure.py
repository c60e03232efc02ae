"""Simulate a built graph on token windows: the mean counts per sequence, the site activity and the perplexity
of the simulated logits; saved as JSON (sim.json) for `spikecompile report` and the analytic mode's rates."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field, model_validator

from spikecompile.errors import SpikecompileError
from spikecompile.evaluation import perplexity_of, window_nll
from spikecompile.files import atomic_write, read_document
from spikecompile.ir import layer_indices
from spikecompile.modelschema import FieldError, Record, fault
from spikecompile.progress import bar

from . import simulate_windows
from .results import Counts, SimRun

FORMAT = "spikecompile.sim"
FORMAT_VERSION = 1


def measure(graph, store, windows: list[torch.Tensor], mode: str = "event", attention: str = "causal",
            mask_steps: int | None = None, dtype: torch.dtype | None = None,
            progress: bool = True) -> tuple[SimRun, float]:
    """(the mean SimRun per sequence over `windows`, the perplexity of the simulated logits). The windows go
    through the graph layer by layer (simulate_windows); each window's counts are kept, its logits only until
    their NLL is taken (a window's are seq × vocab)."""
    if not windows:
        raise SpikecompileError("simulation: no token windows to run")
    runs: list[SimRun] = []
    nll: list[float] = []
    layers = len(layer_indices(graph))
    with bar(total=layers * len(windows), desc=f"simulating ({mode})", unit="layer", progress=progress) as shown:
        results = simulate_windows(graph, store, windows, mode, attention, mask_steps, dtype, progress=shown.update)
        for ids in windows:  # not zip or enumerate: their reused tuple would hold the last window's logits
            result = next(results)
            nll.append(window_nll(result.logits, ids))
            runs.append(dataclasses.replace(result, logits=None))
            del result
    return mean_run(runs), perplexity_of(nll, windows)


def mean_run(runs: list[SimRun]) -> SimRun:
    """The average of runs over sequences of equal length: counts and spikes per sequence."""
    if len({run.tokens for run in runs}) != 1:
        raise SpikecompileError("simulation: windows of different lengths cannot be averaged")
    share = 1.0 / len(runs)
    first = runs[0]

    def mean_counts(column: str) -> dict[str, Counts]:
        return {name: sum((getattr(run, column)[name] for run in runs), Counts()).scaled(share)
                for name in getattr(first, column)}

    sites = {}
    for site, entry in first.sites.items():
        per_step = [sum(run.sites[site]["spikes_per_step"][t] for run in runs) * share
                    for t in range(entry["timesteps"])]
        sites[site] = {**entry, "spikes_per_step": per_step,
                       "firing_rate": sum(per_step) / (entry["elements"] * entry["timesteps"])}
    return SimRun(tokens=first.tokens, snn=mean_counts("snn"), ann=mean_counts("ann"), layers=dict(first.layers),
                  sites=sites)


def save_run(run: SimRun, path: str | Path, meta: dict, energy: dict | None = None) -> None:
    """Write the run (counts per node, sites), `meta` (model, mode, windows, perplexity, ...) and, when given, the
    ledger's `energy` summary (informational: report prices the counts again) as JSON."""
    extra = {} if energy is None else {"energy": energy}
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta, **extra, "tokens": run.tokens,
               "layers": run.layers, "sites": run.sites,
               "snn": {name: counts.to_dict() for name, counts in run.snn.items()},
               "ann": {name: counts.to_dict() for name, counts in run.ann.items()}}
    text = json.dumps(payload, indent=1) + "\n"
    atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


Amount = Annotated[float, Field(ge=0)]  # a count or a mean of counts: finite, ≥ 0


class _ModelMeta(Record):
    path: str
    sha256: str


class _Meta(Record):
    model: _ModelMeta
    attention: str


class _Site(Record):
    layer: Annotated[int, Field(ge=0)] | None
    kind: str
    timesteps: Annotated[int, Field(ge=1)]
    elements: Annotated[int, Field(ge=1)]
    spikes_per_step: list[Amount]
    firing_rate: Amount

    @model_validator(mode="after")
    def _one_count_per_step(self):
        if len(self.spikes_per_step) != self.timesteps:
            raise FieldError("spikes_per_step", f"has {len(self.spikes_per_step)} entries, timesteps is "
                                                f"{self.timesteps}")
        return self


class _Run(Record):
    """What `report` reads from sim.json (the rest is informational)."""

    meta: _Meta
    tokens: Annotated[int, Field(ge=1)]
    layers: dict[str, Annotated[int, Field(ge=0)] | None]
    sites: dict[str, _Site]
    snn: dict[str, dict[str, Amount]]
    ann: dict[str, dict[str, Amount]]


def load_run(path: str | Path) -> tuple[SimRun, dict]:
    """(the run, its meta) from a file save_run wrote; SpikecompileError naming the file and what is wrong."""
    payload = read_document(path, "simulation run (spikecompile build --target sim writes one)", FORMAT,
                            FORMAT_VERSION, "simulate again")
    problem = fault(_Run, payload)
    if problem:
        raise SpikecompileError(f"{path}: {problem}; simulate again")
    try:
        run = SimRun(tokens=payload["tokens"], layers=payload["layers"], sites=payload["sites"],
                     snn={name: Counts(**counts) for name, counts in payload["snn"].items()},
                     ann={name: Counts(**counts) for name, counts in payload["ann"].items()})
    except (KeyError, TypeError, ValueError) as error:
        raise SpikecompileError(f"{path}: malformed simulation run ({type(error).__name__}: {error})") from None
    return run, payload["meta"]
