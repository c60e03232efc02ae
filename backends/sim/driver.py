"""`spikecompile build --target sim`: simulate the built graph on token windows of a text and write sim.json
(the run: counts, site activity, perplexity) and the energy report (report.json, report.md, plots).
"""

from __future__ import annotations

from pathlib import Path

import torch

from spikecompile.data import load_text, token_windows
from spikecompile.errors import SpikecompileError
from spikecompile.evaluation import perplexity
from spikecompile.files import file_sha256
from spikecompile.hardware.energy import load_target
from spikecompile.hardware.loihi2 import Loihi2, load_loihi2
from spikecompile.passes.deployment import (
    CalibrationRun, check_overflow, fitted_fraction_bits, payload_grid_line, payload_grids_entry, saturation_lines,
)
from spikecompile.passes.loihi_mapping import deployed_formats

from .. import BuildResult, parse_options, widened_result
from ..options import BY_TARGET
from .counting import check_attention
from .ledger import ledger
from .measure import measure, save_run
from .report import write_report

OPTIONS = BY_TARGET["sim"]
RUN_FILE = "sim.json"


def check(options: dict) -> dict:
    """The options parsed, with the text and the energy target loaded in place of their names: everything
    checked before the model is loaded."""
    check_attention(options.get("attention", "causal"))
    parsed = parse_options(OPTIONS, options)
    if parsed["loihi2_target"] is not None and parsed["numerics"] != "loihi2":
        raise SpikecompileError("--loihi2-target describes the chip --numerics loihi2 runs on; add --numerics loihi2")
    return {**parsed, "text": load_text(parsed["text"], split="eval"),
            "energy_target": load_target(parsed["energy_target"]),
            "loihi2_target": load_loihi2(parsed["loihi2_target"]) if parsed["numerics"] == "loihi2" else None}


def build(result: BuildResult, folder: str | Path, *, text, windows: int, seqlen: int, mode: str, attention: str,
          mask_steps: int | None, float64: bool, energy_target, progress: bool, numerics: str = "float",
          allow_saturation: bool = False, loihi2_target: Loihi2 | None = None) -> dict:
    """Simulate `result` on `windows` windows of `seqlen` tokens of `text` (loaded by check); write sim.json and
    the energy report priced with `energy_target` into `folder`; return {"meta": sim.json's meta, "ledger": ...}.
    numerics "loihi2": the perplexity is the deployed fixed-point model's, and an accumulator that overflows on these
    windows is a SpikecompileError unless allow_saturation (then meta["loihi2"] reports it)."""
    result = widened_result(result)
    token_ids = token_windows(result.tokenizer, text, seqlen, windows, "simulation")
    dtype = torch.float64 if float64 else None
    target = loihi2_target or (load_loihi2() if numerics == "loihi2" else None)
    formats = deployed_formats(result.graph, result.store, target) if target else None  # bad formats: fail first
    run, ppl = measure(result.graph, result.store, token_ids, mode, attention, mask_steps, dtype, progress)
    ppl_float, saturation = ppl, None
    if formats is not None:  # the counts stay the float run's; the perplexity is the deployed model's
        fraction_bits = fitted_fraction_bits(result.graph, result.store, target, result.record, result.tokenizer)
        formats = deployed_formats(result.graph, result.store, target, fraction_bits)
        fixed = CalibrationRun(result.graph, result.store, formats)
        ppl = perplexity(fixed, token_ids, desc="simulating (loihi2 fixed point)", progress=progress)
        saturation = {"data": f"{text.name} ({len(token_ids)} x {seqlen} tokens)", **fixed.report(),
                      "payload_grids": payload_grids_entry(formats, fraction_bits)}
        check_overflow(saturation["synapses"], allow_saturation, saturation["data"])
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    meta = {"model": {"path": result.model_path, "sha256": file_sha256(result.model_path)},
            "source": result.record["source"], "coding": result.record["coding"], "text": text.name,
            "windows": len(token_ids), "seqlen": seqlen, "mode": mode, "attention": attention,
            "mask_steps": mask_steps, "dtype": "float64" if float64 else "float32", "ppl": ppl,
            "numerics": numerics, "ppl_float": ppl_float, "loihi2": saturation,
            "seed": result.record["conversion"]["seed"],
            "prefix_token_ids": result.record["prefix"]["token_ids"] if result.record["prefix"] else []}
    energy = ledger(run, energy_target, attention)
    save_run(run, folder / RUN_FILE, meta, energy_summary(energy))
    write_report(run, energy, folder)
    return {"meta": meta, "ledger": energy}


def energy_summary(energy: dict) -> dict:
    """What sim.json keeps of the ledger: the target, and per column (snn, ann, ann_int8) and tier the energy per
    token and sequence with the SNN's ratios (report.json holds the whole ledger)."""
    total = energy["total"]
    return {"target": energy["target"]["name"], "unit": energy["unit"],
            **{key: value for key, value in total.items() if key != "counts"}}


def report_lines(report: dict, folder: str | Path) -> list[str]:
    """The perplexity, then SNN and ANN energy per token of each tier, then what was written."""
    meta, total = report["meta"], report["ledger"]["total"]
    plural = "s" * (meta["windows"] != 1)
    lines = [f"simulated {meta['windows']} window{plural} x {meta['seqlen']} tokens ({meta['mode']} mode): "
             f"perplexity {meta['ppl']:.4f}"]
    if meta.get("numerics") == "loihi2":
        lines[0] += f" (Loihi 2 fixed point; float {meta['ppl_float']:.4f}, ratio {meta['ppl'] / meta['ppl_float']:.4f})"
        lines += ["  " + line for line in (payload_grid_line(meta["loihi2"]["payload_grids"]),
                                           *saturation_lines(meta["loihi2"], meta["loihi2"]["data"]))]
    for tier in ("compute", "neuron", "memory"):
        snn, ann = (total[side]["per_token"][tier] for side in ("snn", "ann"))
        line = f"  {tier:<8} per token: SNN {snn:.4g} J   ANN {ann:.4g} J   SNN/ANN {snn / ann:.3f}"
        if "ann_int8" in total:
            int8 = total["ann_int8"]["per_token"][tier]
            line += f"   ANN int8 {int8:.4g} J   SNN/ANN int8 {snn / int8:.3f}"
        lines.append(line)
    folder = Path(folder)
    lines.append(f"wrote {folder / RUN_FILE} and the report ({folder / 'report.md'})")
    return lines
