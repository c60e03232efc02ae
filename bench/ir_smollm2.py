"""IR benchmark on SmolLM2-135M-Instruct (issue: IR, graph frontend and pass manager).

For T in (6, 8): convert (phase coding, grains 2, Hadamard rotation, WikiText-2 valid calibration: the protocol
of bench/convert_smollm2.py), then in this process:
  * build: load model.pt, trace, run the default passes (cleanup, assign_timesteps, fold_hadamard); time each
    stage and write the IR folder to measure its size on disk;
  * grains: the same build with assign_grains, --grain-search even (refit on the fixed even split) and darts
    (Algorithm 2, then refit); time of the pass, and perplexity of each built IR (interpreted, decoded mode) on
    the first 64 windows of 512 tokens of WikiText-2 test, beside the float model (the IR with its sites off);
    --check-ir adds the build as converted (tests already check it computes the converted model).
Prints a table and writes bench/results/ir_smollm2.json.

    python bench/ir_smollm2.py [--timesteps 6 8] [--windows 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from spikecompile.devices import peak_rss_mb

from convert_smollm2 import CALIB, ROOT, TEST, convert

RESULTS = ROOT / "bench" / "results" / "ir_smollm2.json"


def folder_bytes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in sorted(folder.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[6, 8])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--searches", nargs="+", default=["even", "darts"])
    parser.add_argument("--check-ir", action="store_true", help="also the perplexity of the build as converted")
    args = parser.parse_args()
    for path in (CALIB, TEST):
        if not path.is_file():
            sys.exit(f"error: {path} is missing; the benchmark reads ../shared/data")

    from spikecompile.backends import ir as ir_backend
    from spikecompile.build import BuildOptions, build
    from spikecompile.data import load_text, token_windows
    from spikecompile.evaluation import perplexity
    from spikecompile.files import atomic_write
    from spikecompile.ir import interpret
    from spikecompile.ir import sites_off
    from spikecompile.ir import PhaseNeuron

    text = load_text(str(TEST), split="eval")
    results = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", "windows": args.windows, "seqlen": args.seqlen,
               "runs": []}

    def save():
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(RESULTS, lambda temp: Path(temp).write_text(json.dumps(results, indent=2) + "\n"))

    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        for timesteps in args.timesteps:
            model_path, _ = convert(workdir, timesteps, "phase", 2)
            options = BuildOptions()
            built = build(model_path, options)
            windows = token_windows(built.tokenizer, text, args.seqlen, args.windows, "evaluation")
            if "ann_ppl" not in results:
                results["ann_ppl"] = perplexity(lambda ids, b=built: interpret(b.graph, b.store, ids,
                                                                               {PhaseNeuron: sites_off}),
                                                windows, desc="ANN")
            folder = workdir / f"ir-t{timesteps}"
            report = ir_backend.build(built, folder)
            run = {"timesteps": timesteps,
                   "build": {"seconds": report["seconds"],
                             "trace_plus_passes_s": report["seconds"]["trace"] + report["seconds"]["passes"],
                             "passes": {entry["name"]: entry["seconds"] for entry in report["passes"]},
                             "nodes": report["nodes"], "bytes": folder_bytes(folder)}}
            if args.check_ir:  # the built graph as converted (the tests check it computes the converted model)
                run["build"]["ir_ppl"] = perplexity(lambda ids, b=built: interpret(b.graph, b.store, ids), windows,
                                                    desc="built IR")
            del built
            for search in args.searches:
                options = BuildOptions(grain_search=search)
                start = time.perf_counter()
                built = build(model_path, options)
                (grains,) = [entry for entry in built.passes if entry["name"] == "assign_grains"]
                notes = {key: value for key, value in grains["notes"].items() if not isinstance(value, dict | list)}
                ppl = perplexity(lambda ids, b=built: interpret(b.graph, b.store, ids), windows, desc=search)
                run[search] = {"pass_s": grains["seconds"], "build_and_ppl_s": time.perf_counter() - start,
                               "notes": notes, "ppl": ppl, "ppl_ratio": ppl / results["ann_ppl"]}
                del built
            run["peak_rss_mb"] = peak_rss_mb()
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            save()

    print(f"\nfloat perplexity (the IR with its sites off, so with the KV prefix) {results['ann_ppl']:.3f} "
          f"({args.windows} windows x {args.seqlen}); ratios are against it")
    print(f"{'T':>3}{'trace+passes s':>16}{'IR MiB':>9}" +
          "".join(f"{search + ' ratio':>13}{search + ' s':>10}" for search in args.searches))
    for run in results["runs"]:
        size = sum(run["build"]["bytes"].values()) / 2**20
        print(f"{run['timesteps']:>3}{run['build']['trace_plus_passes_s']:>16.2f}{size:>9.1f}" +
              "".join(f"{run[search]['ppl_ratio']:>13.4f}{run[search]['pass_s']:>10.1f}" for search in args.searches))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
