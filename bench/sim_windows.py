"""Simulating many windows at 7B width (issue 15): layer by layer over the windows against window by window.

bench/scale.py's random LLaMA-2-7B-shaped bf16 model (--layers decoder layers) is converted
(`convert -T 8 --calib-windows 1 --calib-seqlen 128 --dtype bfloat16`) and built (the default passes, as
`build --target sim` builds it). In one process, on the same built model and windows of the built-in text, it then
times, alternately, --repeats times each:
  * layer by layer: backends.sim.measure, which runs the windows through the graph one layer segment at a time and
    reads each weight once per segment for the whole group (simulate.run_windows);
  * window by window: backends.sim.simulate on each window in turn (the way measure ran before), the NLL taken
    from each window's logits as measure takes it.
Both must give the same perplexity and counts (checked). Prints the figures and writes
bench/results/sim_windows.json.

    python bench/sim_windows.py [--layers 8] [--windows 4] [--seqlen 64] [--repeats 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scale import write_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "sim_windows.json"
CONVERT = ("-T", "8", "--calib-windows", "1", "--calib-seqlen", "128", "--dtype", "bfloat16", "--no-progress")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="where the model is written (kept; reused)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sim-windows-"))
    source, model = workdir / f"llama2-7b-shape-{args.layers}layers", workdir / f"model-{args.layers}layers.pt"
    if not (source / "config.json").is_file():
        write_model(source, args.layers)
    if not model.is_file():
        subprocess.run([sys.executable, "-m", "spikecompile", "convert", str(source), "-o", str(model), *CONVERT],
                       check=True)

    from spikecompile.backends import widened_result
    from spikecompile.backends.sim import simulate
    from spikecompile.backends.sim.measure import mean_run, measure
    from spikecompile.build import BuildOptions, build
    from spikecompile.data import load_text, token_windows
    from spikecompile.devices import peak_rss_mb
    from spikecompile.evaluation import perplexity_of, window_nll

    started = time.perf_counter()
    built = widened_result(build(str(model), BuildOptions(), progress=False))
    build_s = time.perf_counter() - started
    windows = token_windows(built.tokenizer, load_text("builtin", split="eval"), args.seqlen, args.windows, "bench")

    def layer_by_layer():
        return measure(built.graph, built.store, windows, "decoded", progress=False)

    def window_by_window():
        runs, nll = [], []
        for ids in windows:
            result = simulate(built.graph, built.store, ids, "decoded")
            nll.append(window_nll(result.logits, ids))
            runs.append(result)
        return mean_run(runs), perplexity_of(nll, windows)

    seconds = {"layer_by_layer": [], "window_by_window": []}
    answers = {}
    for _ in range(args.repeats):
        for name, run in (("layer_by_layer", layer_by_layer), ("window_by_window", window_by_window)):
            started = time.perf_counter()
            counts, ppl = run()
            seconds[name].append(time.perf_counter() - started)
            answers[name] = (ppl, counts.snn)
    same = answers["layer_by_layer"] == answers["window_by_window"]
    best = {name: min(times) for name, times in seconds.items()}
    results = {"shape": "llama2-7b", "layers": args.layers, "windows": args.windows, "seqlen": args.seqlen,
               "mode": "decoded", "build_s": build_s, "seconds": seconds, "best_s": best,
               "speedup": best["window_by_window"] / best["layer_by_layer"], "same_perplexity_and_counts": same,
               "ppl": answers["layer_by_layer"][0], "peak_rss_mb": peak_rss_mb()}
    print(f"{args.layers} layers, {args.windows} x {args.seqlen} tokens: layer by layer "
          f"{best['layer_by_layer']:.1f} s, window by window {best['window_by_window']:.1f} s "
          f"({results['speedup']:.2f}x); the same perplexity and counts: {same}; build {build_s:.1f} s, "
          f"peak RSS {results['peak_rss_mb']:.0f} MB")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    if not same:
        sys.exit("error: the two ways gave different results")


if __name__ == "__main__":
    main()
