"""Spikes per activation of the signed-digit neuron at equal MSE, per site kind, on SmolLM2's own samples (issue 16).

The calibration samples stored in a converted SmolLM2 model.pt (8192 per site; default: every site of layers
0, 10, 20 and 29 and the final norm), refitted here at T = 8, 2 grains:
  * base 2 at each site's error-minimising τ, unsigned (`las`) and signed digits: the same levels, so the same
    MSE off ties; the signed code's non-adjacent form needs fewer nonzero steps;
  * fitted: `phase` (Algorithm 1, MSE only) against `phase-sd` fitted with the spike penalty λ of LAMBDAS; per
    site the λ with the fewest spikes whose MSE is at most the `phase` neuron's (equal or lower MSE), or none.
Prints a table per site kind and writes bench/results/signed_digits.json and .md.

    PYTHONPATH=. python bench/signed_digits.py --model out/frontier/model-t-8/model.pt [--layers 0 10 20 29] [--T 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from spikecompile.conversion.fit import FitConfig, fit_sites, quantizer_stats
from spikecompile.neuron import base2_params

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
LAMBDAS = (0.0, 0.3, 1.0, 2.0, 3.0, 5.0)


def chosen_sites(record: dict, layers: list[int]) -> list[str]:
    return [name for name, entry in record["sites"].items() if entry["layer"] in layers or entry["layer"] is None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="a converted SmolLM2 model.pt (default: convert one, T=8 phase, as bench/convert_smollm2.py)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    parser.add_argument("--T", type=int, default=8)
    args = parser.parse_args()
    if args.model is None:
        from convert_smollm2 import convert

        args.model = convert(Path(tempfile.mkdtemp(prefix="smollm2-")), 8, "phase", 2)[0]
    record = torch.load(args.model, weights_only=True)
    names = chosen_sites(record, args.layers)
    samples = torch.stack([record["sites"][name]["samples"].float() for name in names])
    kinds = [record["sites"][name]["kind"] for name in names]

    phase = fit_sites(samples, FitConfig(T=args.T, n_grains=2, coding="phase"), progress=False)
    phase_stats = quantizer_stats(samples, phase.params)
    base2 = base2_params(phase.base2_tau, args.T, 2)
    unsigned_stats = quantizer_stats(samples, base2)
    signed_stats = quantizer_stats(samples, replace(base2, signed_digits=True))
    signed_fits = {}
    for penalty in LAMBDAS:
        fit = fit_sites(samples, FitConfig(T=args.T, n_grains=2, coding="phase-sd", spike_penalty=penalty),
                        progress=False)
        signed_fits[penalty] = quantizer_stats(samples, fit.params)
        print(f"phase-sd λ={penalty}: fitted", flush=True)

    rows = []
    for index, (name, kind) in enumerate(zip(names, kinds)):
        mse, spikes = (float(value) for value in phase_stats[index])
        admissible = [(float(stats[index, 1]), penalty, float(stats[index, 0]))
                      for penalty, stats in signed_fits.items() if stats[index, 0] <= phase_stats[index, 0]]
        best = min(admissible) if admissible else None
        rows.append({"site": name, "kind": kind, "phase_mse": mse, "phase_spikes": spikes,
                     "base2_mse": float(unsigned_stats[index, 0]), "base2_spikes": float(unsigned_stats[index, 1]),
                     "base2_signed_mse": float(signed_stats[index, 0]),
                     "base2_signed_spikes": float(signed_stats[index, 1]),
                     "sd_lambda": None if best is None else best[1],
                     "sd_spikes": None if best is None else best[0], "sd_mse": None if best is None else best[2]})

    by_kind = defaultdict(list)
    for row in rows:
        by_kind[row["kind"]].append(row)
    summary = {}
    for kind, members in by_kind.items():
        matched = [row for row in members if row["sd_spikes"] is not None]

        def mean(key, group=members):
            return sum(row[key] for row in group) / len(group) if group else None

        summary[kind] = {
            "sites": len(members), "matched": len(matched),
            "base2_spikes": mean("base2_spikes"), "base2_signed_spikes": mean("base2_signed_spikes"),
            "base2_mse_ratio": mean("base2_signed_mse") / mean("base2_mse"),
            "phase_spikes_matched": mean("phase_spikes", matched), "sd_spikes_matched": mean("sd_spikes", matched),
            "sd_over_phase_mse_matched": (sum(row["sd_mse"] for row in matched) / sum(row["phase_mse"] for row in matched)
                                          if matched else None)}
    lines = ["| site kind | sites | base 2: unsigned → signed spikes (MSE ratio) | fitted at equal or lower MSE: phase → "
             "phase-sd spikes (sites matched, MSE ratio) |", "|---|---|---|---|"]
    for kind, entry in summary.items():
        base = (f"{entry['base2_spikes']:.3f} → {entry['base2_signed_spikes']:.3f} "
                f"({100 * (entry['base2_signed_spikes'] / entry['base2_spikes'] - 1):+.1f} %, "
                f"{entry['base2_mse_ratio']:.3f})")
        if entry["matched"]:
            fitted = (f"{entry['phase_spikes_matched']:.3f} → {entry['sd_spikes_matched']:.3f} "
                      f"({100 * (entry['sd_spikes_matched'] / entry['phase_spikes_matched'] - 1):+.1f} %; "
                      f"{entry['matched']}/{entry['sites']}, {entry['sd_over_phase_mse_matched']:.3f})")
        else:
            fitted = f"no λ of {LAMBDAS} reaches the phase neuron's MSE"
        lines.append(f"| {kind} | {entry['sites']} | {base} | {fitted} |")
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "signed_digits.json").write_text(json.dumps(
        {"model": str(args.model), "T": args.T, "layers": args.layers, "lambdas": LAMBDAS, "by_kind": summary,
         "sites": rows}, indent=1) + "\n")
    (RESULTS / "signed_digits.md").write_text(table)


if __name__ == "__main__":
    main()
