"""The comparison table (issue: coding zoo): every coding on SmolLM2-135M-Instruct, one setup, one run.

For each T (8 and 6) and each row — the ANN; las, spikedattn, rate, ttfs, sdllm (T = 8 only: sdllm needs
T = 2^(b−1), 4-bit counts); phase with grains 1/2/3 on the fixed even split and with Algorithm 2's adaptive
split (assign_grains, --grain-search darts; one grain has only one split) — this
  * converts (the CLI, in its own process: wall time; calibration on WikiText-2 valid, Hadamard rotation,
    prefixed outlier tokens, as bench/convert_smollm2.py),
  * builds the IR and runs it in decoded mode on the first `windows` windows of `seqlen` tokens of WikiText-2
    test (perplexity), and simulates the first `sim_windows` of them with the counters on (decoded mode counts
    exactly what event mode counts): the mean firing rate over every spike site and the energy per token in
    three tiers (compute, + neuron state, + memory; targets/cmos45nm.toml), ANN beside,
  * scores COPA (100) and OpenBookQA (500) zero-shot through lm-eval (acc, acc_norm) on the built IR.
The ANN row is the float model (no sites, no prefix) scored the same way. Writes bench/results/compare.json and
bench/results/compare.md (the table the README quotes).

    python bench/compare.py [--timesteps 8 6] [--windows 64] [--sim-windows 4] [--rows las phase-g2 ...]
                            [--task-limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from spikecompile.devices import peak_rss_mb

from convert_smollm2 import CALIB, ROOT, SHARED, TEST, convert

RESULTS = ROOT / "bench" / "results" / "compare.json"
TABLE = ROOT / "bench" / "results" / "compare.md"
TASKS = {"copa": SHARED / "copa_val.jsonl", "openbookqa": SHARED / "openbookqa_test.jsonl"}
FIXED = ("las", "spikedattn", "rate", "ttfs", "sdllm")
PHASE = ("phase-g1", "phase-g2", "phase-g3", "phase-g2-adaptive", "phase-g3-adaptive")


def rows_for(timesteps: int, chosen: list[str] | None) -> list[str]:
    rows = ["ann", *(coding for coding in FIXED if coding != "sdllm" or timesteps in (4, 8, 16)), *PHASE]
    return [row for row in rows if chosen is None or row in chosen]


def row_setup(row: str) -> tuple[str, int, str | None]:
    """(coding, grains, grain search) of a table row."""
    if not row.startswith("phase"):
        return row, 1, None
    parts = row.split("-")
    return "phase", int(parts[1][1:]), "darts" if parts[-1] == "adaptive" else None


def zero_shot(model_path: Path, mode: str, limit: int | None, graph=None) -> dict:
    """lm-eval acc / acc_norm per task; with `graph`, its neurons replace the converted ones (adaptive rows)."""
    from spikecompile.conversion.convert import load_spiking_model
    from spikecompile.ir import PhaseNeuron
    from spikecompile.zeroshot import SpikecompileLM, score_tasks

    spiking = load_spiking_model(str(model_path))
    if graph is not None:
        for name in graph:
            if isinstance(graph[name], PhaseNeuron):
                spiking.sites[graph[name].site].neuron = graph[name].params()
    lm = SpikecompileLM(path=str(model_path), mode=mode, spiking=spiking)
    return score_tasks(lm, TASKS, (mode,), limit)["results"][mode]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[8, 6])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--sim-windows", type=int, default=4, help="windows simulated with the counters on")
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows (e.g. ann las phase-g2)")
    parser.add_argument("--task-limit", type=int, default=None, help="score only the first N items of each task")
    args = parser.parse_args()
    for path in (CALIB, TEST, *TASKS.values()):
        if not path.is_file():
            sys.exit(f"error: {path} is missing; the benchmark reads ../shared/data")

    from spikecompile.backends.sim.ledger import ledger
    from spikecompile.backends.sim.measure import measure
    from spikecompile.backends.sim.results import firing_rates

    from spikecompile.build import BuildOptions, build
    from spikecompile.conversion.convert import load_spiking_model
    from spikecompile.data import load_text, token_windows
    from spikecompile.evaluation import perplexity
    from spikecompile.files import atomic_write
    from spikecompile.hardware.energy import load_target
    from spikecompile.ir import interpret

    text = load_text(str(TEST), split="eval")
    target = load_target("cmos45nm")
    results = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", "calibration": CALIB.name, "evaluation": TEST.name,
               "windows": args.windows, "seqlen": args.seqlen, "sim_windows": args.sim_windows,
               "energy_target": "cmos45nm",
               "tasks": {name: path.name for name, path in TASKS.items()}, "task_limit": args.task_limit, "runs": []}
    if RESULTS.is_file():  # a run replaces only its own rows: other T (and, with --rows, other rows) stay
        previous = json.loads(RESULTS.read_text())
        results["runs"] = [run for run in previous["runs"] if run["timesteps"] not in args.timesteps
                           or (args.rows is not None and run["row"] not in args.rows)]

    def save():
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        results["runs"].sort(key=lambda run: (-run["timesteps"], order(run["row"])))
        atomic_write(RESULTS, lambda temp: Path(temp).write_text(json.dumps(results, indent=2) + "\n"))
        table = markdown(results)
        atomic_write(TABLE, lambda temp: Path(temp).write_text(table))

    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        for timesteps in args.timesteps:
            converted: dict[tuple[str, int], tuple[Path, dict]] = {}
            for row in rows_for(timesteps, args.rows):
                start = time.perf_counter()
                coding, grains, search = row_setup(row if row != "ann" else "phase-g2")
                if (coding, grains) not in converted:
                    converted[coding, grains] = convert(workdir, timesteps, coding, grains, tag=f"{coding}-g{grains}")
                model_path, conversion = converted[coding, grains]
                entry = {"timesteps": timesteps, "row": row}
                if row == "ann":
                    spiking = load_spiking_model(str(model_path))
                    windows = token_windows(spiking.tokenizer, text, args.seqlen, args.windows, "evaluation")
                    entry["ppl"] = perplexity(spiking.ann_logits, windows, desc="ANN")
                    del spiking
                    entry["tasks"] = zero_shot(model_path, "ann", args.task_limit)
                else:
                    built = build(model_path, BuildOptions(grain_search=search))
                    windows = token_windows(built.tokenizer, text, args.seqlen, args.windows, "evaluation")
                    entry["ppl"] = perplexity(lambda ids, b=built: interpret(b.graph, b.store, ids), windows,
                                              desc=row)
                    run, entry["sim_ppl"] = measure(built.graph, built.store, windows[:args.sim_windows], "decoded")
                    energy = ledger(run, target)["total"]
                    entry["firing_rate"] = firing_rates(run.sites)["overall"]
                    entry["energy_per_token_j"] = {"snn": energy["snn"]["per_token"], "ann": energy["ann"]["per_token"]}
                    entry["conversion_s"] = conversion["process_wall_s"]
                    entry["conversion_stages_s"] = conversion["timings_s"]
                    if search:
                        (grain_pass,) = [item for item in built.passes if item["name"] == "assign_grains"]
                        entry["assign_grains_s"] = grain_pass["seconds"]
                        entry["conversion_s"] += grain_pass["seconds"]
                    entry["tasks"] = zero_shot(model_path, "spiking", args.task_limit, built.graph if search else None)
                    del built, run
                entry["row_wall_s"] = time.perf_counter() - start
                entry["peak_rss_mb"] = peak_rss_mb()
                results["runs"].append(entry)
                print(json.dumps(entry), flush=True)
                save()
    print(markdown(results))
    print(f"wrote {RESULTS} and {TABLE}")


def order(row: str) -> int:
    rows = ["ann", *FIXED, *PHASE]
    return rows.index(row) if row in rows else len(rows)


def markdown(results: dict) -> str:
    """The comparison table, one per T."""
    limit = f" (first {results['task_limit']} items)" if results["task_limit"] else ""
    lines = [f"# Coding comparison on {results['model']}", "",
             (f"Perplexity: WikiText-2 test, {results['windows']} windows x {results['seqlen']} tokens (simulated, "
             f"decoded mode); ratio against the ANN. Firing rate and energy: the first {results['sim_windows']} "
             f"windows simulated with the counters on. Zero-shot: lm-eval acc / acc_norm on COPA (100) "
             f"and OpenBookQA (500){limit}. "
             f"Energy per token in mJ on {results['energy_target']} (compute | + neuron state | + memory), "
             f"ANN in the ANN row. Firing rate: spikes / (elements x T) over every site. Conversion: wall time of the "
             f"convert process (+ the assign_grains pass for adaptive rows)."), ""]
    for timesteps in sorted({run["timesteps"] for run in results["runs"]}, reverse=True):
        runs = [run for run in results["runs"] if run["timesteps"] == timesteps]
        ann = next((run for run in runs if run["row"] == "ann"), None)
        lines += [f"## T = {timesteps}", "",
                  ("| coding | PPL | PPL ratio | COPA acc / norm | OBQA acc / norm | firing rate | "
                   "energy mJ/token (compute / +neuron / +memory) | conversion s |"),
                  "|---|---|---|---|---|---|---|---|"]
        for run in runs:
            ratio = f"{run['ppl'] / ann['ppl']:.3f}" if ann else "–"
            tasks = run.get("tasks", {})
            cells = [f"{tasks[name]['acc']:.3f} / {tasks[name]['acc_norm']:.3f}" if name in tasks else "–"
                     for name in ("copa", "openbookqa")]
            if run["row"] == "ann":
                energy = next((r["energy_per_token_j"]["ann"] for r in runs if "energy_per_token_j" in r), None)
                rate, seconds = "–", "–"
            else:
                energy = run["energy_per_token_j"]["snn"]
                rate, seconds = f"{run['firing_rate']:.3f}", f"{run['conversion_s']:.0f}"
            joules = (" / ".join(f"{energy[tier] * 1e3:.2f}" for tier in ("compute", "neuron", "memory"))
                      if energy else "–")
            lines.append(f"| {run['row']} | {run['ppl']:.2f} | {ratio} | {cells[0]} | {cells[1]} | {rate} | "
                         f"{joules} | {seconds} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
