"""The spike penalty's trade (issue 16, item 1): MSE and spikes per activation of the fitted neuron at several λ.

Synthetic samples of each site kind (Gaussian, Laplace, SiLU(2·N(0,1)), softmax rows), 4096 each, fitted with
fit_sites at T = 8, 2 grains, `phase` and `phase-sd`, at λ in LAMBDAS (J = MSE/MSE_2 + λ·spikes, fit.py). Each row
is one (coding, λ, kind): MSE over the base-2 MSE at its own best τ, and the mean nonzero steps per activation, next
to the base-2 neuron's (unsigned) spikes. Writes bench/results/spike_penalty.json and .md.

    PYTHONPATH=. python bench/spike_penalty.py [--T 8] [--samples 4096]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from spikecompile.conversion.fit import FitConfig, fit_sites, spikes_per_activation
from spikecompile.neuron import base2_params

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
LAMBDAS = (0.0, 0.1, 0.3, 1.0, 3.0)
KINDS = ("gaussian", "laplace", "silu", "softmax")


def synthetic_sites(count: int, seed: int = 0) -> torch.Tensor:
    """[4, count] samples, one row per kind of KINDS."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(count, generator=generator)
    uniform = torch.rand(count, generator=generator).clamp(1e-7, 1 - 1e-7) - 0.5
    laplace = -torch.sign(uniform) * torch.log1p(-2 * uniform.abs())
    silu = torch.nn.functional.silu(2 * torch.randn(count, generator=generator))
    softmax = torch.softmax(3 * torch.randn(count // 64, 64, generator=generator), -1).flatten()
    return torch.stack([gaussian, laplace, silu, softmax])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4096)
    args = parser.parse_args()
    samples = synthetic_sites(args.samples)
    rows = []
    for coding in ("phase", "phase-sd"):
        for penalty in LAMBDAS:
            fit = fit_sites(samples, FitConfig(T=args.T, n_grains=2, coding=coding, spike_penalty=penalty))
            spikes = spikes_per_activation(samples, fit.params)
            base2 = spikes_per_activation(samples, base2_params(fit.base2_tau, args.T, 2))
            for index, kind in enumerate(KINDS):
                rows.append({"coding": coding, "lambda": penalty, "kind": kind,
                             "mse_over_base2": float(fit.mse[index] / fit.base2_mse[index]),
                             "spikes": float(spikes[index]), "base2_spikes": float(base2[index])})
                print(f"{coding:9} λ={penalty:<5} {kind:9} MSE/base2 {rows[-1]['mse_over_base2']:.3f}  "
                      f"spikes {rows[-1]['spikes']:.3f}  (base 2: {rows[-1]['base2_spikes']:.3f})", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "spike_penalty.json").write_text(json.dumps({"T": args.T, "samples": args.samples, "rows": rows},
                                                           indent=1) + "\n")
    lines = ["| coding | λ | " + " | ".join(f"{kind} MSE/b2, spikes" for kind in KINDS) + " |",
             "|---|---|" + "---|" * len(KINDS)]
    for coding in ("phase", "phase-sd"):
        for penalty in LAMBDAS:
            cells = [next(r for r in rows if r["coding"] == coding and r["lambda"] == penalty and r["kind"] == kind)
                     for kind in KINDS]
            lines.append(f"| {coding} | {penalty} | " + " | ".join(f"{c['mse_over_base2']:.2f}, {c['spikes']:.2f}"
                                                                 for c in cells) + " |")
    (RESULTS / "spike_penalty.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
