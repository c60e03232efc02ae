"""One-sided and offset sites, measured before building them (issue 16, item 2), on SmolLM2's own samples.

For every site of a converted SmolLM2 model.pt (its 8192 stored calibration samples) the base-2 neuron at T = 8,
2 grains, each at its own error-minimising τ (fit.py's grid), codes
  * x itself (sign-magnitude: the sign costs no step), and
  * x − c for an offset c folded into the next synapse's bias: c = the bounded side's edge (the samples' minimum,
    where it is above −max/4: SiLU ≥ −0.28, softmax ≥ 0, ...) and c = the samples' median;
and the table gives, per site kind, the MSE and spikes per activation of each against coding x, and the
fitted/Lloyd-Max ratio against both bounds: 2^(T+1) − 1 levels (two-sided) and 2^T levels on the occupied side
only (the fair bound for a one-sided code). Writes bench/results/offset_sites.json and .md.

    PYTHONPATH=. python bench/offset_sites.py --model out/smollm2-t8.pt [--T 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from spikecompile.conversion.fit import FitConfig, best_base2, lloyd_max_mse, quantizer_stats

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def base2_stats(samples: torch.Tensor, T: int) -> torch.Tensor:
    """[S, 2]: MSE and spikes per activation of each row's base-2 neuron at its error-minimising τ."""
    neuron = best_base2(samples, FitConfig(T=T, n_grains=2))
    return quantizer_stats(samples, neuron)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="a converted SmolLM2 model.pt (default: convert one, T=8 phase, as bench/convert_smollm2.py)")
    parser.add_argument("--T", type=int, default=8)
    args = parser.parse_args()
    if args.model is None:
        from convert_smollm2 import convert

        args.model = convert(Path(tempfile.mkdtemp(prefix="smollm2-")), 8, "phase", 2)[0]
    record = torch.load(args.model, weights_only=True)
    names = list(record["sites"])
    samples = torch.stack([record["sites"][name]["samples"].float() for name in names])
    kinds = [record["sites"][name]["kind"] for name in names]
    low, high = samples.amin(-1), samples.amax(-1)
    one_sided = low > -high.abs() / 4  # a bounded lower side (SiLU, probabilities, ...)
    edge = torch.where(one_sided, low, torch.zeros_like(low))
    median = samples.median(-1).values
    plain = base2_stats(samples, args.T)
    at_edge = base2_stats(samples - edge[:, None], args.T)
    at_median = base2_stats(samples - median[:, None], args.T)
    two_sided_bound = lloyd_max_mse(samples, 2 ** (args.T + 1) - 1)
    one_sided_bound = lloyd_max_mse(samples, 2 ** args.T)
    fitted = torch.tensor([record["sites"][name]["calibration"]["mse"] for name in names])

    by_kind = defaultdict(list)
    for index, kind in enumerate(kinds):
        by_kind[kind].append(index)
    summary = {}
    for kind, rows in by_kind.items():
        rows_t = torch.tensor(rows)

        def ratio(numerator, denominator):
            return float(numerator[rows_t].sum() / denominator[rows_t].sum())

        summary[kind] = {
            "sites": len(rows), "one_sided": int(one_sided[rows_t].sum()),
            "min_over_max": float((low[rows_t] / high[rows_t].abs()).median()),
            "edge_mse_ratio": ratio(at_edge[:, 0], plain[:, 0]), "edge_spike_ratio": ratio(at_edge[:, 1], plain[:, 1]),
            "median_mse_ratio": ratio(at_median[:, 0], plain[:, 0]),
            "median_spike_ratio": ratio(at_median[:, 1], plain[:, 1]),
            "fitted_over_two_sided_bound": float((fitted[rows_t] / two_sided_bound[rows_t]).median()),
            "fitted_over_one_sided_bound": float((fitted[rows_t] / one_sided_bound[rows_t]).median())}
    lines = ["| site kind | sites (one-sided) | median min/max | x − edge: MSE, spikes vs x | x − median: MSE, spikes vs x |"
             " fitted / Lloyd-Max, 2^(T+1)−1 levels | fitted / Lloyd-Max, 2^T levels |",
             "|---|---|---|---|---|---|---|"]
    for kind, entry in summary.items():
        lines.append(f"| {kind} | {entry['sites']} ({entry['one_sided']}) | {entry['min_over_max']:.3f} | "
                     f"{entry['edge_mse_ratio']:.3f}, {entry['edge_spike_ratio']:.3f} | "
                     f"{entry['median_mse_ratio']:.3f}, {entry['median_spike_ratio']:.3f} | "
                     f"{entry['fitted_over_two_sided_bound']:.2f} | {entry['fitted_over_one_sided_bound']:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "offset_sites.json").write_text(json.dumps({"model": str(args.model), "T": args.T,
                                                          "by_kind": summary}, indent=1) + "\n")
    (RESULTS / "offset_sites.md").write_text(table)


if __name__ == "__main__":
    main()
