"""ONNX export benchmark on SmolLM2-135M-Instruct (issue: ONNX target).

model.pt is --model, or converted here (phase coding, T=8, grains 2, Hadamard rotation, WikiText-2 valid
calibration: bench/convert_smollm2.py's protocol). In this process:
  * build: load, trace and the default passes (spikecompile.build);
  * export: both forms (decoded, event) — seconds to lower, to write and check (onnx.checker, full), bytes on disk,
    ONNX node counts;
  * speed: on the first --windows windows of --seqlen tokens of WikiText-2 test, onnxruntime (CPU, default
    threads) running each form beside the reference simulator (backends.sim.simulate, as `build --target sim`
    runs it, counting included) in the same mode — seconds, tokens/s, session start-up — and the largest logit
    difference ORT vs simulator, free running, relative to the largest logit;
  * agreement node by node (backends.onnx.check, the model cut open at every neuron and fed the simulator's
    values) on the first --check-tokens tokens of the first window: largest relative difference of any neuron
    input and of the logits, spikes flipped (and flipped although the neuron's input was bit for bit the same).
Prints a summary and writes bench/results/onnx_smollm2.json.

Windows are 256 tokens by default: at 512 the simulator's event mode, which keeps every node's [T, ...] value for
its counters, needs more memory than a 23 GB machine has (≈9.6 GB peak at 256); onnxruntime's event form stays under
4 GB at 512 (it frees each intermediate once read).

    python bench/onnx_smollm2.py [--model out/smollm2-t8.pt] [--windows 2] [--seqlen 256] [--check-tokens 128]
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

RESULTS = ROOT / "bench" / "results" / "onnx_smollm2.json"
FORMS = ("decoded", "event")


def timed(function, *args):
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


def speed(result, folder: Path, windows: list, form: str) -> dict:
    """onnxruntime and the simulator on the same windows in one mode; seconds, tokens/s, agreement."""
    import torch

    from spikecompile.backends.onnx import run, session
    from spikecompile.backends.sim import simulate

    ort_session, startup = timed(session, folder / f"{form}.onnx")
    ort_seconds = sim_seconds = 0.0
    errors = []
    for ids in windows:
        outputs, seconds = timed(run, ort_session, {"input_ids": ids}, ["logits"])
        ort_seconds += seconds
        with torch.inference_mode():
            simulated, seconds = timed(simulate, result.graph, result.store, ids, form)
        sim_seconds += seconds
        expected = simulated.logits
        errors.append(float((torch.from_numpy(outputs["logits"]) - expected).abs().max() / expected.abs().max()))
    tokens = sum(ids.numel() for ids in windows)
    return {"onnxruntime": {"session_s": startup, "seconds": ort_seconds, "tokens_per_s": tokens / ort_seconds},
            "sim": {"seconds": sim_seconds, "tokens_per_s": tokens / sim_seconds},
            "onnxruntime_over_sim_speed": sim_seconds / ort_seconds,
            "free_running_max_relative_logit_difference": max(errors)}


def node_by_node(result, folder: Path, ids, form: str) -> dict:
    """The export cut open at every neuron, fed the simulator's values (backends.onnx.check.agreement)."""
    import onnx

    from spikecompile.backends.onnx import agreement
    from spikecompile.backends.sim.simulate import run

    reference = run(result.graph, result.store, ids, form).values
    return agreement(onnx.load(str(folder / f"{form}.onnx")), result.graph, {"input_ids": ids}, reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="A converted SmolLM2 model.pt (default: convert one, T=8).")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--check-tokens", type=int, default=128)
    args = parser.parse_args()
    for path in (CALIB, TEST):
        if not path.is_file():
            sys.exit(f"error: {path} is missing; the benchmark reads ../shared/data")

    import onnxruntime

    from spikecompile.backends.onnx import build_onnx
    from spikecompile.build import BuildOptions, build
    from spikecompile.data import load_text, token_windows
    from spikecompile.files import atomic_write

    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        model = Path(args.model) if args.model else convert(workdir, 8, "phase", 2)[0]
        result, build_seconds = timed(build, model, BuildOptions())
        report, export_seconds = timed(build_onnx, result, workdir / "onnx")
        windows = token_windows(result.tokenizer, load_text(str(TEST), split="eval"), args.seqlen, args.windows,
                                "benchmark")
        forms = {form: {"export": {"lower_s": report["forms"][form]["seconds"]["lower"],
                                   "write_and_check_s": report["forms"][form]["seconds"]["write_and_check"],
                                   "mib": report["forms"][form]["bytes"] / 2**20,
                                   "external_data": report["forms"][form]["data"] is not None,
                                   "onnx_nodes": report["forms"][form]["nodes"]},
                        **speed(result, workdir / "onnx", windows, form),
                        "node_by_node": node_by_node(result, workdir / "onnx", windows[0][:, :args.check_tokens], form)}
                 for form in FORMS}
    results = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", "model_pt": str(args.model or "converted, T=8"),
               "windows": args.windows, "seqlen": args.seqlen, "check_tokens": args.check_tokens, "text": TEST.name,
               "opset": report["opset"],
               "onnxruntime": onnxruntime.__version__, "build_s": build_seconds, "export_s": export_seconds,
               "ir_nodes": report["ir_nodes"], "forms": forms,
               "peak_rss_mb": peak_rss_mb()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS, lambda temp: Path(temp).write_text(json.dumps(results, indent=2) + "\n"))

    print(f"SmolLM2 T=8: build {build_seconds:.1f} s, ONNX export (both forms) {export_seconds:.1f} s, "
          f"{args.windows} windows x {args.seqlen} tokens")
    print(f"{'form':<9}{'MiB':>8}{'nodes':>8}{'export s':>10}{'ORT tok/s':>11}{'sim tok/s':>11}{'ORT/sim':>9}"
          f"{'free diff':>11}{'input diff':>12}{'logit diff':>12}{'flipped':>14}")
    for form, figures in forms.items():
        export, check = figures["export"], figures["node_by_node"]
        print(f"{form:<9}{export['mib']:>8.1f}{export['onnx_nodes']:>8}"
              f"{export['lower_s'] + export['write_and_check_s']:>10.1f}"
              f"{figures['onnxruntime']['tokens_per_s']:>11.1f}{figures['sim']['tokens_per_s']:>11.1f}"
              f"{figures['onnxruntime_over_sim_speed']:>9.2f}"
              f"{figures['free_running_max_relative_logit_difference']:>11.1e}"
              f"{check['input_difference']:>12.1e}{check['output_difference']:>12.1e}"
              f"{check['flipped'] / check['elements']:>14.1e}")
    print("free diff: free-running logits vs the simulator (spike flips from 1-ulp differences grow layer by layer); "
          "input/logit diff and flipped (fraction): node by node, fed the simulator's neuron outputs")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
