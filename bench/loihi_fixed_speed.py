"""The fixed-point simulator's cost against the float decoded simulator (issue 17's target: ≤ 2×), side by side.

SmolLM2 T=8 (converted, or --model), WikiText-2 test windows of 512 tokens. Each window runs the float decoded
simulator (`build --target sim --mode decoded`'s forward) and then the deployed fixed-point model (`--numerics
loihi2`'s forward, payload grids fitted as the build fits them), alternating, so that load on a shared machine
hits both alike; the ratio is of the medians. The first window of each is a warm-up (kernel load, tables) and is
not counted. Writes bench/results/loihi_fixed_speed.json.

    python bench/loihi_fixed_speed.py [--windows 4] [--model MODEL.pt]
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from convert_smollm2 import ROOT, built_smollm2, smollm2_arguments

RESULTS = ROOT / "bench" / "results" / "loihi_fixed_speed.json"


def main() -> None:
    args = smollm2_arguments(__doc__.splitlines()[0], windows=4)
    from spikecompile.backends.sim.simulate import output_of, run
    from spikecompile.passes.deployment import CalibrationRun, fitted_fraction_bits
    from spikecompile.passes.loihi_mapping import deployed_formats

    result, windows = built_smollm2(args.model, args.seqlen, args.windows + 1)
    graph, store = result.graph, result.store
    formats = deployed_formats(graph, store, None, fitted_fraction_bits(graph, store, None, result.record,
                                                                          result.tokenizer))
    fixed = CalibrationRun(graph, store, formats)
    seconds: dict[str, list[float]] = {"float_decoded": [], "fixed": []}
    with torch.inference_mode():
        for index, window in enumerate(windows):
            for label, forward in (("float_decoded", lambda ids: output_of(graph, run(
                    graph, store, ids, "decoded", keep_values=False, spikes="tally"))), ("fixed", fixed)):
                start = time.perf_counter()
                forward(window[None] if window.dim() == 1 else window)
                if index:  # window 0 warms up
                    seconds[label].append(time.perf_counter() - start)
            print(index, {label: values[-1:] for label, values in seconds.items()}, flush=True)
    medians = {label: statistics.median(values) for label, values in seconds.items()}
    summary = {"windows": args.windows, "seqlen": args.seqlen, "seconds": seconds, "median_s": medians,
               "fixed_over_float_decoded (target ≤ 2)": medians["fixed"] / medians["float_decoded"],
               "threads": torch.get_num_threads()}
    RESULTS.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
