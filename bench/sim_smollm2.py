"""Reference-simulator benchmark on SmolLM2-135M-Instruct (issue: sim backend and energy ledger).

Converts SmolLM2 at T=8 (and T=6 for the analytic rates; phase coding, grains 2, rotation, WikiText-2 valid
calibration), builds the IR, and on the first 16 windows of 512 tokens of WikiText-2 test times, each in its own
process (so peak RSS is its own): the float model through the IR interpreter (the ANN forward), the simulator in
decoded mode, and in event mode — seconds, tokens/s, peak RSS, and the ratios decoded/ANN and event/ANN side by
side. The event run's energy ledger (three tiers, ANN beside) is kept, and an analytic ledger for the LLaMA-3-8B
config at sequence length 512, T=6, with the firing rates per site kind measured on SmolLM2 at T=6.
Prints a table and writes bench/results/sim_smollm2.json.

    python bench/sim_smollm2.py [--windows 16] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from convert_smollm2 import CALIB, ROOT, TEST, convert

RESULTS = ROOT / "bench" / "results" / "sim_smollm2.json"
LLAMA3_8B = ROOT / "targets" / "models" / "llama-3-8b.json"


def time_forward(model_path: str, mode: str, windows: int, seqlen: int, out: str) -> None:
    """(subprocess) build, then run `mode` over the windows; write its figures (and the run) to `out`."""
    import torch

    from spikecompile.backends.sim.ledger import ledger
    from spikecompile.backends.sim.measure import mean_run, save_run
    from spikecompile.backends.sim import simulate
    from spikecompile.build import BuildOptions, build
    from spikecompile.data import load_text, token_windows
    from spikecompile.frontend import interpret, sites_off
    from spikecompile.ir import PhaseNeuron
    from spikecompile.target import load_target

    result = build(model_path, BuildOptions())
    ids = token_windows(result.tokenizer, load_text(str(TEST), split="eval"), seqlen, windows, "benchmark")
    runs = []
    start = time.perf_counter()
    with torch.inference_mode():
        for window in ids:
            if mode == "ann":
                interpret(result.graph, result.store, window, {PhaseNeuron: sites_off})
            else:
                runs.append(simulate(result.graph, result.store, window, mode))
    seconds = time.perf_counter() - start
    figures = {"mode": mode, "seconds": seconds, "tokens_per_s": windows * seqlen / seconds,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if runs:
        run = mean_run(runs)
        save_run(run, Path(out).with_suffix(".run.json"), {"mode": mode})
        energy = ledger(run, load_target("cmos45nm"))
        figures["ledger_total"] = {side: energy["total"][side] for side in ("snn", "ann", "snn_over_ann")}
        figures["firing_rate"] = sum(sum(s["spikes_per_step"]) for s in run.sites.values()) / sum(
            s["elements"] * s["timesteps"] for s in run.sites.values())
    Path(out).write_text(json.dumps(figures))


def run_mode(model_path: Path, mode: str, args, workdir: Path) -> dict:
    out = workdir / f"{model_path.stem}-{mode}.json"
    subprocess.run([sys.executable, __file__, "--child", str(model_path), mode, str(out), "--windows",
                    str(args.windows), "--seqlen", str(args.seqlen)], check=True)
    figures = json.loads(out.read_text())
    print(json.dumps({key: value for key, value in figures.items() if key != "ledger_total"}), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "OUT"))
    args = parser.parse_args()
    if args.child:
        time_forward(*args.child[:2], args.windows, args.seqlen, args.child[2])
        return
    for path in (CALIB, TEST, LLAMA3_8B):
        if not path.is_file():
            sys.exit(f"error: {path} is missing")

    from spikecompile.backends.sim.analytic import analytic_run, rates_by_kind
    from spikecompile.frontend.config import config_graph, load_config
    from spikecompile.backends.sim.ledger import ledger
    from spikecompile.backends.sim.measure import load_run
    from spikecompile.modelfile import atomic_write
    from spikecompile.target import load_target

    results = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", "windows": args.windows, "seqlen": args.seqlen}
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        model_t8, _ = convert(workdir, 8, "phase", 2)
        modes = {mode: run_mode(model_t8, mode, args, workdir) for mode in ("ann", "decoded", "event")}
        results["T8"] = modes
        results["decoded_over_ann"] = modes["decoded"]["seconds"] / modes["ann"]["seconds"]
        results["event_over_ann"] = modes["event"]["seconds"] / modes["ann"]["seconds"]

        model_t6, _ = convert(workdir, 6, "phase", 2)
        t6 = run_mode(model_t6, "decoded", args, workdir)
        rates = rates_by_kind(load_run(workdir / f"{model_t6.stem}-decoded.run.json")[0])
        start = time.perf_counter()
        graph = config_graph(load_config(LLAMA3_8B), timesteps=6, grains=2)
        analytic = ledger(analytic_run(graph, 512, rates), load_target("cmos45nm"))
        results["llama3_8b_analytic"] = {"seq_len": 512, "timesteps": 6, "rates_from": "SmolLM2 T=6 decoded run",
                                         "rates": rates, "seconds": time.perf_counter() - start,
                                         "smollm2_t6_firing_rate": t6["firing_rate"],
                                         "total": {side: analytic["total"][side]
                                                   for side in ("snn", "ann", "snn_over_ann", "counts")}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS, lambda temp: Path(temp).write_text(json.dumps(results, indent=2) + "\n"))

    print(f"\nSmolLM2 T=8, {args.windows} windows x {args.seqlen} tokens")
    print(f"{'mode':<9}{'seconds':>9}{'tokens/s':>10}{'RSS MB':>8}")
    for mode, figures in modes.items():
        print(f"{mode:<9}{figures['seconds']:>9.1f}{figures['tokens_per_s']:>10.1f}{figures['peak_rss_mb']:>8.0f}")
    print(f"decoded/ANN {results['decoded_over_ann']:.2f} (target ≤ 1.2); event/ANN {results['event_over_ann']:.2f} "
          f"(target ≤ T = 8)")
    for name, total in (("SmolLM2 T=8 (measured)", modes["event"]["ledger_total"]),
                        ("LLaMA-3-8B T=6 (analytic)", results["llama3_8b_analytic"]["total"])):
        print(f"{name}: J per sequence  " + "  ".join(
            f"{tier}: ANN {total['ann']['per_sequence'][tier]:.3g} SNN {total['snn']['per_sequence'][tier]:.3g} "
            f"({total['snn_over_ann'][tier]:.3f})" for tier in ("compute", "neuron", "memory")))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
