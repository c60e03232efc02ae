"""Conversion benchmark on SmolLM2-135M-Instruct (issue: foundation).

Calibration on ../shared/data/wikitext-2.wiki.valid.tokens; evaluation on the first 64 windows of 512 tokens of
../shared/data/wikitext-2-raw.wiki.test.raw. For T in (6, 8, 10): fitted phase coding (grains 2, Hadamard
rotation) beside `las` (base 2) at the same T and rotation. Each conversion runs in its own process (the CLI),
so its wall time and peak RSS are its own. Prints a table and writes bench/results/convert_smollm2.json.

    python bench/convert_smollm2.py [--timesteps 6 8 10] [--windows 64] [--codings phase las]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spikecompile.cli import site_error_rows

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
CALIB = SHARED / "wikitext-2.wiki.valid.tokens"
TEST = SHARED / "wikitext-2-raw.wiki.test.raw"
RESULTS = ROOT / "bench" / "results" / "convert_smollm2.json"


def convert(workdir: Path, timesteps: int, coding: str, grains: int, tag: str | None = None) -> tuple[Path, dict]:
    output = workdir / f"{tag or coding}-t{timesteps}.pt"
    report = workdir / f"{tag or coding}-t{timesteps}.json"
    command = [sys.executable, "-m", "spikecompile", "convert", "-o", str(output), "--timesteps", str(timesteps),
               "--grains", str(grains), "--coding", coding, "--rotate", "hadamard", "--calib", str(CALIB),
               "--json", str(report), "--no-progress"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    figures = json.loads(report.read_text())
    figures["process_wall_s"] = wall
    return output, figures


def smollm2_arguments(description: str, windows: int) -> argparse.Namespace:
    """--windows, --seqlen and --model, the options of the benches that run a converted SmolLM2 T=8."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--windows", type=int, default=windows)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--model", type=Path, help="a converted SmolLM2 T=8 model.pt (default: convert one)")
    return parser.parse_args()


def built_smollm2(model: Path | None, seqlen: int, windows: int):
    """(build.BuildResult of `model` or of a fresh T=8 phase conversion, `windows` WikiText-2 test windows)."""
    from spikecompile.build import BuildOptions, build
    from spikecompile.data import load_text, token_windows

    with tempfile.TemporaryDirectory() as workdir:
        result = build(model or convert(Path(workdir), 8, "phase", 2)[0], BuildOptions())
    return result, token_windows(result.tokenizer, load_text(str(TEST), split="eval"), seqlen, windows, "bench")


def site_ratios(record: dict) -> dict:
    rows = site_error_rows(record)
    return {"median_fitted_over_lloyd_max": statistics.median(row["fitted_over_bound"] for row in rows),
            "median_base2_over_lloyd_max": statistics.median(row["base2_over_bound"] for row in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[6, 8, 10])
    parser.add_argument("--codings", nargs="+", default=["phase", "las"])
    parser.add_argument("--grains", type=int, default=2)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    for path in (CALIB, TEST):
        if not path.is_file():
            sys.exit(f"error: {path} is missing; the benchmark reads ../shared/data")

    from spikecompile.conversion.convert import load_spiking_model
    from spikecompile.data import load_text, token_windows
    from spikecompile.evaluation import perplexity
    from spikecompile.files import atomic_write

    text = load_text(str(TEST), split="eval")
    results = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", "calibration": CALIB.name, "evaluation": TEST.name,
               "windows": args.windows, "seqlen": args.seqlen, "grains": args.grains, "runs": []}
    with tempfile.TemporaryDirectory() as workdir:
        for timesteps in args.timesteps:
            for coding in args.codings:
                path, conversion = convert(Path(workdir), timesteps, coding, args.grains)
                spiking = load_spiking_model(str(path))
                windows = token_windows(spiking.tokenizer, text, args.seqlen, args.windows, "evaluation")
                if "ann_ppl" not in results:
                    results["ann_ppl"] = perplexity(spiking.ann_logits, windows, desc="ANN")
                    if spiking.prefix is not None:  # what the prefix alone does to the float model
                        with spiking.sites.all_off():
                            results["ann_with_prefix_ppl"] = perplexity(spiking.logits, windows, desc="ANN+prefix")
                snn = perplexity(spiking.logits, windows, desc=f"{coding} T={timesteps}")
                run = {"coding": coding, "timesteps": timesteps, "snn_ppl": snn,
                       "ppl_ratio": snn / results["ann_ppl"],
                       "convert_s": conversion["timings_s"]["calibration"] + conversion["timings_s"]["fitting"],
                       "timings_s": conversion["timings_s"], "peak_rss_mb": conversion["peak_rss_mb"],
                       **site_ratios(spiking.record)}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(RESULTS, lambda temp: Path(temp).write_text(json.dumps(results, indent=2) + "\n"))

    print(f"\nANN perplexity {results['ann_ppl']:.3f} ({args.windows} windows x {args.seqlen}); "
          f"float model after the KV prefix: {results.get('ann_with_prefix_ppl', float('nan')):.3f}")
    print(f"{'coding':<8}{'T':>4}{'SNN ppl':>10}{'ratio':>8}{'convert s':>11}{'RSS MB':>8}{'fit/LM':>8}{'b2/LM':>8}")
    for run in results["runs"]:
        print(f"{run['coding']:<8}{run['timesteps']:>4}{run['snn_ppl']:>10.3f}{run['ppl_ratio']:>8.4f}"
              f"{run['convert_s']:>11.1f}{run['peak_rss_mb']:>8.0f}{run['median_fitted_over_lloyd_max']:>8.2f}"
              f"{run['median_base2_over_lloyd_max']:>8.2f}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
