"""The perplexity cost of Loihi 2's fixed point on SmolLM2-135M-Instruct, one quantization step at a time (issue 17).

Converts SmolLM2 at T=8 (phase coding, grains 2, Hadamard rotation, WikiText-2 valid calibration; or reuses
--model), builds the IR and evaluates on WikiText-2 test windows:

    ann            the float model through the IR interpreter, every site off
    ann_w8         the same with the synapse matrices in their deployed 8-bit format (per-row scale)
    snn_float      the float spiking model (simulator, decoded)
    snn_w8_matrix  the spiking model with 8-bit weights of one power-of-two exponent per matrix (Loihi's own
                   weight exponent), for comparison with the per-row scale the deployment uses
    snn_w8         + weights: the spiking model with the deployed 8-bit weights (per-row scale), everything else float
    snn_fixed      + potentials/thresholds/payloads on the integer grid and the ops on the host in float64: the
                   deployed model (simulator --numerics loihi2, bit-exact with Lava fixed_pt), its payload grids
                   fitted on 2 calibration windows so that no accumulator overflows there (1 bit of headroom)

The non-synaptic ops run in float64 on the host (hardware.loihi2.OP_FORMAT), so they add no quantization of their
own: the last step is the sites' integer grid alone. Also times snn_float against snn_fixed (the target: ≤ 2×),
and counts the window sums that overflow a 24-bit accumulator on the test windows.
Writes bench/results/loihi_fixed.json.

    python bench/loihi_fixed.py [--windows 64] [--seqlen 512] [--model MODEL.pt]
"""

from __future__ import annotations

import json
import time

import torch
from convert_smollm2 import ROOT, TEST, built_smollm2, smollm2_arguments

RESULTS = ROOT / "bench" / "results" / "loihi_fixed.json"


def main() -> None:
    args = smollm2_arguments(__doc__.splitlines()[0], windows=64)
    from spikecompile.backends.sim.simulate import output_of, run
    from spikecompile.evaluation import perplexity
    from spikecompile.ir import PhaseNeuron, interpret, sites_off
    from spikecompile.hardware.loihi2 import quantize_weights
    from spikecompile.passes.deployment import CalibrationRun, fitted_fraction_bits
    from spikecompile.passes.loihi_mapping import deployed_formats

    result, windows = built_smollm2(args.model, args.seqlen, args.windows)
    graph, store = result.graph, result.store
    start = time.perf_counter()
    fraction_bits = fitted_fraction_bits(graph, store, None, result.record, result.tokenizer)
    fit_seconds = time.perf_counter() - start
    formats = deployed_formats(graph, store, None, fraction_bits)
    w8, w8_matrix = dict(store), dict(store)
    for name, synapse in formats.synapses.items():
        w8[graph[name].weight.name] = torch.from_numpy(synapse.dequantized()).float()
        mantissa, exponent = quantize_weights(store[graph[name].weight.name].double().numpy(), 8)
        w8_matrix[graph[name].weight.name] = torch.from_numpy(mantissa * 2.0 ** exponent).float()
    fixed = CalibrationRun(graph, store, formats)

    def ann(weights):
        return lambda ids: interpret(graph, weights, ids, {PhaseNeuron: sites_off})

    def snn(weights):
        return lambda ids: output_of(graph, run(graph, weights, ids, "decoded", keep_values=False, spikes="tally"))

    steps = {"ann": ann(store), "ann_w8": ann(w8), "snn_float": snn(store), "snn_w8_matrix": snn(w8_matrix),
             "snn_w8": snn(w8), "snn_fixed": fixed}
    figures = {}
    for label, forward in steps.items():
        start = time.perf_counter()
        with torch.inference_mode():
            ppl = perplexity(forward, windows, desc=label, progress=False)
        figures[label] = {"ppl": ppl, "seconds": time.perf_counter() - start}
        print(label, json.dumps(figures[label]), flush=True)
    ppl = {label: entry["ppl"] for label, entry in figures.items()}
    summary = {
        "windows": len(windows), "seqlen": args.seqlen, "timesteps": 8, "text": TEST.name, "steps": figures,
        "payload_grids": {"fit_seconds": fit_seconds, "sites_lowered": {bits: sum(1 for value in fraction_bits.values()
                                                                            if value == bits) for bits in range(4)}},
        "accumulators_on_test": {"synapses": len(formats.synapses),
                                 "overflowing": sum(1 for count in fixed.overflowed.values() if count),
                                 "sums_overflowed": sum(fixed.overflowed.values()), "sums": sum(fixed.sums.values()),
                                 "saturated_potentials": sum(fixed.saturated.values())},
        "ratios": {"weights (snn_w8 / snn_float)": ppl["snn_w8"] / ppl["snn_float"],
                   "weights, one exponent per matrix (snn_w8_matrix / snn_float)":
                       ppl["snn_w8_matrix"] / ppl["snn_float"],
                   "potentials, thresholds, payloads (snn_fixed / snn_w8)": ppl["snn_fixed"] / ppl["snn_w8"],
                   "ops (host float64)": 1.0,
                   "fixed vs float spiking (target ≤ 1.01)": ppl["snn_fixed"] / ppl["snn_float"],
                   "fixed vs ANN w8 (target ≤ 1.03)": ppl["snn_fixed"] / ppl["ann_w8"],
                   "fixed vs ANN": ppl["snn_fixed"] / ppl["ann"]},
        "time_fixed_over_float_decoded (target ≤ 2)": figures["snn_fixed"]["seconds"] / figures["snn_float"]["seconds"],
        "threads": torch.get_num_threads()}
    RESULTS.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
