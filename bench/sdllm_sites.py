"""SDLLM with per-token scales on SmolLM2-135M-Instruct, site kind by site kind (issue 16, item 6).

The frontier's `sdllm T=8, per-token` row is far from the issue's "ratio ≤ 1.10 at D = 8". This bench asks where the
error comes from. For each D (T: D = 8 is SDLLM's 4-bit count, 15 levels; D = 16 its 5-bit count) it converts
SmolLM2 with `--coding sdllm --sdllm-scales per-token` (the CLI; calibration on WikiText-2 valid, Hadamard rotation,
prefix "."), then measures the perplexity on the first W windows × 512 tokens of WikiText-2 test with
  * every site spiking (the frontier's row),
  * only the sites of one kind spiking, every other site off (the float value passes),
  * only the linear layers' inputs (attn_norm, o_proj_in, mlp_norm, down_proj_in, final_norm: what a W16A4
    QuaRot model quantizes), and only the attention's sites (q, k, v, attn_probs),
each as a ratio to the float model with the same prefix (the conversion's own cost) and to the ANN.
Writes bench/results/sdllm_sites.json and .md.

    PYTHONPATH=. python bench/sdllm_sites.py [--steps 8 16] [--windows 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from spikecompile.conversion.convert import load_spiking_model
from spikecompile.data import load_text, token_windows
from spikecompile.evaluation import perplexity
from spikecompile.ir.neurons import SITE_KINDS

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
CALIB = SHARED / "wikitext-2.wiki.valid.tokens"
TEST = SHARED / "wikitext-2-raw.wiki.test.raw"
WORK = ROOT / "out" / "sdllm-sites"
RESULTS = ROOT / "bench" / "results"
GROUPS = {"linear inputs": ("attn_norm", "o_proj_in", "mlp_norm", "down_proj_in", "final_norm"),
          "attention": ("q", "k", "v", "attn_probs")}


def converted(steps: int) -> Path:
    """SmolLM2 converted with SDLLM's per-token scales at D = steps (converted once; kept in out/sdllm-sites/)."""
    model = WORK / f"sdllm-per-token-D{steps}.pt"
    if not model.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "spikecompile", "convert", "-o", str(model), "-T", str(steps),
                               "--coding", "sdllm", "--sdllm-scales", "per-token", "--calib", str(CALIB),
                               "--no-progress"], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"error: convert at D={steps} failed:\n{done.stderr[-2000:]}")
    return model


def ablation(model: Path, windows: int) -> dict:
    """Perplexities of the model with every site, each kind's sites alone, and each group alone spiking."""
    spiking = load_spiking_model(str(model))
    ids = token_windows(spiking.tokenizer, load_text(str(TEST), "test"), 512, windows, "eval")

    def ppl(forward) -> float:
        return perplexity(forward, ids, progress=False)

    with spiking.sites.all_off():
        prefixed = ppl(spiking.logits)
    result = {"ann_ppl": ppl(spiking.ann_logits), "prefixed_float_ppl": prefixed, "spiking": {}}
    for label, chosen in [("every site", SITE_KINDS), *((kind, (kind,)) for kind in SITE_KINDS), *GROUPS.items()]:
        for name, site in spiking.sites.items():
            site.mode = "decoded" if name.split(".")[-1] in chosen else "off"
        value = ppl(spiking.logits)
        result["spiking"][label] = {"ppl": value, "ratio_vs_prefixed_float": value / prefixed,
                                    "ratio_vs_ann": value / result["ann_ppl"]}
        print(f"  {label:14s} {value / prefixed:9.4f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    for path in (CALIB, TEST):
        if not path.is_file():
            sys.exit(f"error: {path} is missing; the benchmark reads ../shared/data")
    torch.set_grad_enabled(False)
    report = {"model": "SmolLM2-135M-Instruct", "coding": "sdllm, per-token min-max scales", "windows": args.windows,
              "seqlen": 512, "torch_threads": torch.get_num_threads(), "runs": {}}
    for steps in args.steps:
        start = time.perf_counter()
        print(f"D = {steps} (ratio to the float model with the prefix):", flush=True)
        report["runs"][str(steps)] = {**ablation(converted(steps), args.windows),
                                      "seconds": time.perf_counter() - start}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sdllm_sites.json").write_text(json.dumps(report, indent=1) + "\n")
    labels = list(next(iter(report["runs"].values()))["spiking"])
    lines = [f"SDLLM per-token on SmolLM2, {args.windows} × 512 WikiText-2 test tokens: PPL ratio to the float model "
             f"with the same prefix (to the ANN in brackets), with only these sites spiking.", "",
             "| sites spiking | " + " | ".join(f"D = {steps}" for steps in report["runs"]) + " |",
             "|---|" + "---|" * len(report["runs"])]
    for label in labels:
        cells = [f"{run['spiking'][label]['ratio_vs_prefixed_float']:.3f} ({run['spiking'][label]['ratio_vs_ann']:.3f})"
                 for run in report["runs"].values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    (RESULTS / "sdllm_sites.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
