"""Lava backend and Loihi 2 mapping benchmark on SmolLM2-135M-Instruct (issue: Lava backend, Loihi 2 mapping).

  * emit: the whole converted model, and the MLP and attention blocks of layer 0, as Lava programs (time, bytes);
  * run: each block under Loihi2SimCfg, floating_pt and fixed_pt, as its emitted run.py in a fresh interpreter:
    wall time (interpreter, lava import, build, compile, run), steady steps/s, output error against the decoded
    reference, fixed_pt error against its stated bound, neurons whose spike count differs;
  * map: map_loihi2 on SmolLM2 (rates measured on its calibration samples, weights checked for accumulator
    overflow) and, from their configs alone, LLaMA-2-7B and LLaMA-3-8B (SmolLM2's measured rate per site kind):
    mapping time and the resource table.
The model is converted as bench/convert_smollm2.py does (phase coding, T=8, 2 grains, Hadamard rotation), or
given with --model. Prints the tables and writes bench/results/lava_loihi.json.

    python bench/lava_loihi.py [--model model.pt] [--tokens 4] [--context 512]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from convert_smollm2 import CALIB, ROOT, convert

RESULTS = ROOT / "bench" / "results" / "lava_loihi.json"
ANALYTIC = ("llama-2-7b", "llama-3-8b")


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def run_block(folder: Path, tag: str, report: dict) -> dict:
    """Run the program's run.py once in a fresh interpreter; compare its result with reference.npz."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "run.py", "--tag", tag, "--output", f"result-{tag}.npz"], cwd=folder, check=True,
                   capture_output=True, timeout=600)
    wall = time.perf_counter() - start
    with np.load(folder / f"result-{tag}.npz") as result, np.load(folder / "reference.npz") as reference:
        (name,) = [key.removeprefix("output:") for key in result.files if key.startswith("output:")]
        output, expected = result[f"output:{name}"], reference[f"output:{name}"]
        counts_key = "quantized_counts" if tag == "fixed_pt" else "counts"
        sites = [key.removeprefix("counts:") for key in result.files if key.startswith("counts:")]
        differing = {site: int((result[f"counts:{site}"] != reference[f"{counts_key}:{site}"]).sum()) for site in sites}
        figures = {
            "wall_s": wall, "steps": int(result["steps"]), "steps_per_second": float(result["steps_per_second"]),
            "seconds": {key.removeprefix("seconds:"): float(result[key]) for key in result.files
                        if key.startswith("seconds:")},
            "max_abs_error": float(np.abs(output - expected).max()), "max_abs_output": float(np.abs(expected).max()),
            "spikes": int(sum(result[key].sum() for key in result.files if key.startswith("counts:"))),
            "neurons_differing": {site: count for site, count in differing.items() if count},
            "saturations": int(sum(result[key] for key in result.files if key.startswith("saturated:")))}
        if tag == "fixed_pt":
            figures["max_abs_error_vs_quantized_reference"] = float(np.abs(output - reference[f"quantized:{name}"]).max())
            figures["bound"] = report["fixed_point"]["bound"][name]
            figures["within_bound"] = figures["max_abs_error"] <= figures["bound"]["bound"]
    return figures


def grouped(lines: list[str]) -> dict[str, int]:
    """Diagnostics with the layer index blanked, counted: one entry per kind of misfit."""
    return dict(Counter(re.sub(r"layers\.\d+\.", "layers.*.", line) for line in lines))


def table_row(name: str, report: dict) -> dict:
    traffic = report["traffic_per_token"]
    return {"model": name, "synapses": report["synapses"], "synapse_mib": report["synapse_memory_bits"] / 8 / 2**20,
            "neurons_per_token": report["neurons_per_token"], "cores": report["cores"], "chips": report["chips"],
            "chips_by_synapse_count": report["chips_by_synapse_count"],
            "fits": {system: entry["fits"] for system, entry in report["systems"].items()},
            "traffic_per_token": traffic, "does_not_fit": grouped(report["does_not_fit"]),
            "mapping_s": report["seconds"], "trace_s": report.get("seconds_trace")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a converted SmolLM2 model.pt (default: convert one, T=8)")
    parser.add_argument("--tokens", type=int, default=4, help="sequence length of the emitted blocks")
    parser.add_argument("--context", type=int, default=512, help="tokens an attention query sees, for the mapping")
    args = parser.parse_args()
    if args.model is None and not CALIB.is_file():
        sys.exit(f"error: {CALIB} is missing; give --model or provide ../shared/data")

    from spikecompile.backends.lava import build_lava

    from spikecompile.analytic import load_config, map_config
    from spikecompile.build import BuildOptions, build
    from spikecompile.files import atomic_write
    from spikecompile.passes.loihi_mapping import map_loihi2

    results = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32), phase coding T=8, 2 grains, Hadamard",
               "model_file": str(args.model) if args.model else "converted by this run", "tokens": args.tokens,
               "context": args.context}
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        model_path = args.model or convert(workdir, 8, "phase", 2)[0]
        start = time.perf_counter()
        built = build(model_path, BuildOptions())
        results["build_s"] = time.perf_counter() - start

        start = time.perf_counter()
        whole = build_lava(built, workdir / "model", tokens=args.tokens)
        results["emit_model"] = {"wall_s": time.perf_counter() - start, "seconds": whole["seconds"],
                                 "bytes": whole["bytes"], "processes": whole["processes"], "steps": whole["steps"]}
        results["blocks"] = {}
        for block in ("mlp", "attn"):
            folder = workdir / block
            start = time.perf_counter()
            report = build_lava(built, folder, layers=[0], block=block, tokens=args.tokens)
            emitted = {"emit_s": time.perf_counter() - start, "bytes": folder_bytes(folder),
                       "processes": report["processes"], "neurons": report["neurons"], "synapses": report["synapses"]}
            results["blocks"][block] = {**emitted, **{tag: run_block(folder, tag, report)
                                                      for tag in ("floating_pt", "fixed_pt")}}
            print(json.dumps({block: results["blocks"][block]}), flush=True)

        samples = {name: entry["samples"] for name, entry in built.record["sites"].items() if "samples" in entry}
        smollm2 = map_loihi2(built.graph, built.store, samples=samples, context=args.context)
        rows = [table_row("SmolLM2-135M (traced, measured rates)", smollm2)]
        for name in ANALYTIC:
            report = map_config(load_config(name), timesteps=8, rates=smollm2["rates"]["by_kind"],
                                context=args.context)
            rows.append(table_row(f"{name} (analytic, SmolLM2 rates)", report))
        results["rates_by_kind"] = smollm2["rates"]["by_kind"]
        results["mapping"] = rows

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS, lambda temp: Path(temp).write_text(json.dumps(results, indent=2) + "\n"))
    print_tables(results)
    print(f"wrote {RESULTS}")


def print_tables(results: dict) -> None:
    emit = results["emit_model"]
    print(f"\nemit SmolLM2 (whole model, {results['tokens']} tokens): {emit['wall_s']:.1f} s, "
          f"{emit['bytes'] / 2**20:.0f} MiB, {emit['processes']['lava']} Lava processes, {emit['steps']} steps")
    print(f"{'block':<6}{'tag':<13}{'wall s':>8}{'steps/s':>9}{'max|err|':>10}{'of max|y|':>11}{'bound':>9}"
          f"{'neurons differing':>19}")
    for block, entry in results["blocks"].items():
        for tag in ("floating_pt", "fixed_pt"):
            run = entry[tag]
            bound = f"{run['bound']['bound']:.3g}" if "bound" in run else "-"
            print(f"{block:<6}{tag:<13}{run['wall_s']:>8.1f}{run['steps_per_second']:>9.1f}"
                  f"{run['max_abs_error']:>10.3g}{run['max_abs_error'] / run['max_abs_output']:>11.2e}{bound:>9}"
                  f"{sum(run['neurons_differing'].values()):>19}")
    print(f"\n{'model':<40}{'synapses':>14}{'MiB':>8}{'cores':>9}{'chips':>7}{'by syn.':>8}{'inter-chip/token':>18}"
          f"{'map s':>7}")
    for row in results["mapping"]:
        print(f"{row['model']:<40}{row['synapses']:>14,}{row['synapse_mib']:>8.0f}{row['cores']['total']:>9,}"
              f"{row['chips']:>7}{row['chips_by_synapse_count']:>8}"
              f"{row['traffic_per_token']['inter_chip']:>18,.0f}{row['mapping_s']:>7.2f}")


if __name__ == "__main__":
    main()
