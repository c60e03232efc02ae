"""Build memory at 7B width (issue 15): `build --target ir` and `--target sim` of a LLaMA-2-7B-shaped bf16 model
at a few depths.

bench/scale.py's random bf16 model (hidden 4096, intermediate 11008, vocab 32000; sharded safetensors) is
converted (`convert -T 8 --calib-windows 1 --calib-seqlen 128 --dtype bfloat16`: the build's memory does not
depend on the calibration), built to the IR, and built and simulated (decoded mode, --sim-windows windows of 64
tokens of the built-in text, default 1: the simulator's weights, not its activations, dominate), each command in
its own process
(/usr/bin/time: peak RSS, wall), at each depth of --layers. The build reads the model one part at a time
(conversion.layered), so its peak RSS should not grow with depth; the depths show whether it does.
With `--baseline DIR` (a checkout of an earlier spikecompile, e.g. a git worktree) the same source model is also
converted and built by that version, side by side in the same run (each version builds its own conversion: a
model.pt records its rotation matrices, and a version refuses one made with other matrices); when both versions
wrote the same model.pt, the two IR weight files are compared byte for byte. Prints the figures and writes
bench/results/build_scale.json (a depth measured in an earlier run is kept there unless measured again).

    PYTHONPATH=. python bench/build_scale.py [--layers 2 4] [--targets ir sim] [--baseline /path/to/old/checkout]
                                             [--workdir DIR] [--sim-windows N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from scale import SHAPES, spikecompile_of, write_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "build_scale.json"
CONVERT = ("-T", "8", "--calib-windows", "1", "--calib-seqlen", "128", "--dtype", "bfloat16", "--no-progress")
TARGET_OPTIONS = {"ir": (), "sim": ("--mode", "decoded", "--seqlen", "64")}


def timed(command: list[str], code: Path) -> dict:
    """Run `python -m spikecompile ...` with `code` first on the path, under /usr/bin/time: peak RSS (MB), wall."""
    prefix, environment = spikecompile_of(code)
    done = subprocess.run(["/usr/bin/time", "-f", "%M %e", *prefix, *command],
                          capture_output=True, text=True, env=environment)
    if done.returncode:
        sys.exit(f"error: {' '.join(command[:2])} failed:\n{done.stderr[-3000:]}")
    peak_kb, wall = done.stderr.strip().splitlines()[-1].split()
    return {"peak_rss_mb": int(peak_kb) / 1024, "wall_s": float(wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2])
    parser.add_argument("--baseline", type=Path, default=None, help="an earlier checkout to build with, side by side")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--targets", nargs="+", default=list(TARGET_OPTIONS), choices=list(TARGET_OPTIONS))
    parser.add_argument("--sim-windows", type=int, default=1, help="windows of 64 tokens the sim target runs")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="build-scale-"))
    results = {"shape": SHAPES["llama2-7b"], "convert_options": " ".join(CONVERT), "runs": []}
    kept = {run["layers"]: run for run in json.loads(RESULTS.read_text()).get("runs", [])} if RESULTS.is_file() else {}
    for layers in args.layers:  # a depth or target measured before (in another run) is kept unless measured again
        kept[layers] = merged(kept.get(layers, {}), measure(workdir, layers, args.targets, args.baseline,
                                                            args.sim_windows))
    results["runs"] = list(kept.values())
    results["runs"].sort(key=lambda run: run["layers"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS}")


def measure(workdir: Path, layers: int, targets: list[str], baseline: Path | None, sim_windows: int = 1) -> dict:
    """Convert and build the model of `layers` decoder layers with this version (and the baseline)."""
    folder = workdir / f"llama2-7b-shape-{layers}layers"
    if not (folder / "config.json").is_file():
        write_model(folder, layers)
    parameters = sum(path.stat().st_size for path in folder.glob("*.safetensors")) // 2  # bf16: 2 bytes each
    run = {"layers": layers, "parameters": parameters, "bf16_weights_mb": parameters * 2 / 2**20,
           "sim_windows": sim_windows}
    builds = {"this version": ROOT, **({"baseline": baseline} if baseline else {})}
    for label, code in builds.items():
        run[label] = {}
        tag = f"{layers}layers-{label.replace(' ', '-')}"
        model = workdir / f"model-{tag}.pt"
        if not model.is_file():
            run[label]["convert"] = timed(["convert", str(folder), "-o", str(model), *CONVERT], code)
        for target in targets:
            out = workdir / f"{target}-{tag}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            windows = ("--windows", str(sim_windows)) if target == "sim" else ()
            figures = timed(["build", str(model), "--target", target, "-o", str(out), "--no-progress",
                             *TARGET_OPTIONS[target], *windows], code)
            if label == "baseline":
                figures["checkout"] = _revision(code)
            if target == "ir":
                figures["weights_file_mb"] = (out / "weights.safetensors").stat().st_size / 2**20
            if target == "sim":
                simulated = json.loads((out / "sim.json").read_text())
                counts = json.dumps(simulated["snn"], sort_keys=True).encode()
                figures["ppl"], figures["snn_counts_sha256"] = simulated["meta"]["ppl"], hashlib.sha256(counts).hexdigest()
            run[label][target] = figures
            print(f"{layers} layers, {label:<13} build --target {target}: peak RSS {figures['peak_rss_mb']:.0f} MB, "
                  f"wall {figures['wall_s']:.1f} s" + (f", weights.safetensors {figures['weights_file_mb']:.0f} MB"
                                                       if target == "ir" else "") +
                  f" (bf16 weights {run['bf16_weights_mb']:.0f} MB)", flush=True)
    if baseline:
        same_model = _bytes_equal(*(workdir / f"model-{layers}layers-{label}.pt" for label in ("this-version", "baseline")))
        run["same_model_pt"] = same_model
        if same_model and "ir" in targets:
            run["same_ir_weights"] = _bytes_equal(*(workdir / f"ir-{layers}layers-{label}" / "weights.safetensors"
                                                    for label in ("this-version", "baseline")))
            print(f"{layers} layers: the same model.pt; IR weights byte for byte equal: {run['same_ir_weights']}")
        if same_model and "sim" in targets:
            run["same_sim"] = all(run["baseline"]["sim"][key] == run["this version"]["sim"][key]
                                  for key in ("ppl", "snn_counts_sha256"))
            print(f"{layers} layers: the same model.pt; the same simulated perplexity and counts: {run['same_sim']}")
    return run


def merged(before: dict, now: dict) -> dict:
    """A depth's run: `now`'s figures over `before`'s, per version and target (a run of the sim target alone keeps
    the IR build's figures measured before)."""
    run = {**before, **now}
    for label in ("this version", "baseline"):
        if isinstance(before.get(label), dict) and label in now:
            run[label] = {**before[label], **now[label]}
    return run


def _revision(code: Path) -> str:
    """The commit a checkout is at (its path when it is not a git checkout)."""
    done = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or str(code)


def _bytes_equal(first: Path, second: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(first), str(second)]).returncode == 0


if __name__ == "__main__":
    main()
