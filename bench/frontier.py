"""The accuracy–energy frontier on SmolLM2-135M-Instruct (issue 16, item 5).

Every point is a conversion (the CLI, calibration on WikiText-2 valid, Hadamard rotation, prefix "."), measured,
not estimated:
  * `spikecompile build --target sim --mode decoded` over the first 64 windows × 512 tokens of WikiText-2 test:
    the decoded perplexity and the counts of every window (ACs per ANN MAC; energy per tier, cmos45nm);
  * `spikecompile eval --json` on the same windows: the ANN and the float model after the same prefix (neither
    depends on the spike sites: one eval serves every conversion with the same prefix);
and `spikecompile frontier` draws them with each cost's Pareto set and the papers' published points
(bench/results/frontier/: frontier.json, frontier.md, frontier.png). `--zeroshot LABEL` also scores COPA (100)
and OpenBookQA (500) through lm-eval for that point (both modes: the spiking model and the ANN).

Each stage writes into out/frontier/ (model-<convert options>/: model.pt, eval.json; point-<label>/: sim/) and is
skipped when its output is there, so an interrupted run continues where it stopped (delete a folder to measure
it again).

    PYTHONPATH=. python bench/frontier.py [--points "phase T=8" ...] [--windows 64] [--zeroshot "phase T=8"] [--keep]

--keep: the points already in bench/results/frontier/ that this run does not measure stay in it as they were
measured (frontier.json's values, runs.json's settings), so a few new points join the set without the two hours
of measuring the others again. Only points measured on the same windows and sequence length are kept.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
CALIB = SHARED / "wikitext-2.wiki.valid.tokens"
TEST = SHARED / "wikitext-2-raw.wiki.test.raw"
TASKS = {"copa": SHARED / "copa_val.jsonl", "openbookqa": SHARED / "openbookqa_test.jsonl"}
WORK = ROOT / "out" / "frontier"
RESULTS = ROOT / "bench" / "results" / "frontier"

# label: (convert options, simulator options). Every point: grains 2, Hadamard rotation, prefix auto (".").
# Points with the same convert options share one conversion and its eval (masking only changes the simulator).
POINTS = {
    "phase-sd λ=1, 1.9 ACs/MAC": (["--coding", "phase-sd", "--spike-penalty", "1", "--spikes-per-mac", "1.9"], []),
    "phase, 1.9 ACs/MAC": (["--spikes-per-mac", "1.9"], []),
    "phase T=8": (["-T", "8"], []),
    "phase T=6": (["-T", "6"], []),
    "phase T=8, mask 4": (["-T", "8"], ["--mask-steps", "4"]),
    "phase-sd T=8, λ=1": (["-T", "8", "--coding", "phase-sd", "--spike-penalty", "1"], []),
    "phase-sd λ=1, 1.5 ACs/MAC": (["--coding", "phase-sd", "--spike-penalty", "1", "--spikes-per-mac", "1.5"], []),
    "phase-sd λ=1, 2.2 ACs/MAC": (["--coding", "phase-sd", "--spike-penalty", "1", "--spikes-per-mac", "2.2"], []),
    "phase-sd λ=1, 2.3 ACs/MAC": (["--coding", "phase-sd", "--spike-penalty", "1", "--spikes-per-mac", "2.3"], []),
    "phase-sd λ=1, 2.45 ACs/MAC": (["--coding", "phase-sd", "--spike-penalty", "1", "--spikes-per-mac", "2.45"], []),
    "sdllm T=8, per-token": (["-T", "8", "--coding", "sdllm", "--sdllm-scales", "per-token"], []),
    "sdllm T=8, static": (["-T", "8", "--coding", "sdllm"], []),
}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("λ", "lambda")).strip("-")


def run(command: list[str], log: Path) -> float:
    """Run the CLI, its output into `log`; the wall time. Exits with the log's tail when it fails."""
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run([sys.executable, "-m", "spikecompile", *command], stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"error: {' '.join(command[:2])} failed; see {log}:\n{log.read_text()[-2000:]}")
    return time.perf_counter() - start


def measure(label: str, windows: int, seqlen: int, zeroshot: bool) -> dict:
    """Convert the point's model (and score it zero-shot when asked) and simulate the point, each stage only when
    its output is missing; its file paths and the stages' wall times (evaluate() writes its eval.json)."""
    convert_options, sim_options = POINTS[label]
    model_folder = WORK / ("model-" + slug(" ".join(convert_options)))
    point_folder = WORK / ("point-" + slug(label))
    for folder in (model_folder, point_folder):
        folder.mkdir(parents=True, exist_ok=True)
    model, evaluation, sim = model_folder / "model.pt", model_folder / "eval.json", point_folder / "sim"
    walls_file = model_folder / "walls.json"
    walls = json.loads(walls_file.read_text()) if walls_file.is_file() else {}
    if not model.is_file():
        walls["convert_s"] = run(["convert", "-o", str(model), *convert_options, "--calib", str(CALIB),
                                  "--json", str(model_folder / "convert.json"), "--no-progress"],
                                 model_folder / "convert.log")
    if zeroshot and not (model_folder / "zeroshot.json").is_file():
        tasks = [f"--task={name}={path}" for name, path in TASKS.items()]
        walls["zeroshot_s"] = run(["zeroshot", str(model), *tasks, "--mode", "both",
                                   "--json", str(model_folder / "zeroshot.json")], model_folder / "zeroshot.log")
    walls_file.write_text(json.dumps(walls, indent=1) + "\n")
    if not (sim / "sim.json").is_file():
        sim_s = run(["build", str(model), "--target", "sim", "-o", str(sim), "--mode", "decoded",
                     "--text", str(TEST), "--windows", str(windows), "--seqlen", str(seqlen),
                     "--no-progress", *sim_options], point_folder / "sim.log")
        (point_folder / "sim_s.json").write_text(json.dumps(sim_s) + "\n")
    zeroshot_file = model_folder / "zeroshot.json"
    return {"sim": sim / "sim.json", "model": model, "eval": evaluation,
            "walls_s": {**walls, "sim_s": json.loads((point_folder / "sim_s.json").read_text())},
            "zeroshot": json.loads(zeroshot_file.read_text())["results"] if zeroshot_file.is_file() else None}


def evaluate(files: dict, windows: int, seqlen: int) -> Path:
    """The point's model evaluated (`eval --json`, once): its ANN and prefixed-float baselines."""
    if not files["eval"].is_file():
        wall = run(["eval", str(files["model"]), "--ppl", str(TEST), "--max-windows", str(windows),
                    "--seqlen", str(seqlen), "--json", str(files["eval"]), "--no-progress"],
                   files["eval"].with_suffix(".log"))
        files["walls_s"]["eval_s"] = wall
    return files["eval"]


def kept_points(measuring: list[str], windows: int, seqlen: int) -> tuple[list, dict]:
    """The measured points of bench/results/frontier/ that are not in `measuring`, and their runs.json entries;
    none when those were measured on other windows or another sequence length."""
    from dataclasses import fields

    from spikecompile.backends.sim.frontier import FrontierPoint

    document, runs = (json.loads((RESULTS / name).read_text()) for name in ("frontier.json", "runs.json"))
    if (runs["windows"], runs["seqlen"]) != (windows, seqlen):
        sys.exit(f"error: --keep: {RESULTS} was measured on {runs['windows']} x {runs['seqlen']} tokens, this run "
                 f"on {windows} x {seqlen}; measure every point again without --keep")
    names = {field.name for field in fields(FrontierPoint)}
    points = [FrontierPoint(**{key: value for key, value in point.items() if key in names})
              for point in document["points"] if point["source"] == "measured" and point["label"] not in measuring]
    return points, {point.label: runs["points"][point.label] for point in points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS), metavar="LABEL")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--zeroshot", nargs="*", default=[], choices=list(POINTS), metavar="LABEL")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="an eval --json of a conversion of the same source with the same prefix (default: "
                             "evaluate the first point's model)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the points of bench/results/frontier/ that this run does not measure")
    args = parser.parse_args()
    for path in (CALIB, TEST, *TASKS.values()):
        if not path.is_file():
            sys.exit(f"error: {path} is missing; the benchmark reads ../shared/data")

    from spikecompile.backends.sim.frontier import measured_point, write_frontier
    from spikecompile.errors import SpikecompileError
    from spikecompile.files import atomic_folder
    from spikecompile.hardware.energy import load_target

    target = load_target("cmos45nm")
    measured, extra = kept_points(args.points, args.windows, args.seqlen) if args.keep else ([], {})
    baseline = args.baseline
    for label in args.points:
        files = measure(label, args.windows, args.seqlen, label in args.zeroshot)
        try:  # the baselines depend on the source model and the prefix only: one eval serves them all
            point = measured_point(label, files["sim"], baseline or evaluate(files, args.windows, args.seqlen), target)
        except SpikecompileError:  # this conversion chose another prefix: its own eval
            point = measured_point(label, files["sim"], evaluate(files, args.windows, args.seqlen), target)
        baseline = baseline or files["eval"]
        measured.append(point)
        extra[label] = {"walls_s": files["walls_s"], "convert_options": POINTS[label][0],
                        "sim_options": POINTS[label][1], "zeroshot": files["zeroshot"]}
        print(f"{label:<28} ratio {point.ppl_ratio:.4f} (vs float + prefix {point.ppl_ratio_prefixed:.4f})  "
              f"ACs/MAC {point.costs['acs_per_mac']:.3f}  SNN/ANN " +
              " / ".join(f"{point.costs[tier]:.3f}" for tier in ("compute", "neuron", "memory")), flush=True)
    with atomic_folder(RESULTS, parents=True) as folder:
        write_frontier(measured, folder)
        (folder / "runs.json").write_text(json.dumps({"windows": args.windows, "seqlen": args.seqlen,
                                                      "calibration": CALIB.name, "evaluation": TEST.name,
                                                      "points": extra}, indent=1, ensure_ascii=False) + "\n")
    print((RESULTS / "frontier.md").read_text())
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
