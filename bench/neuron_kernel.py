"""The fused neuron kernel's speed by vector width, on this CPU (neuron/kernel.cpp's VECTOR_BYTES).

The kernel is built once per width (16, 32 and 64 bytes, forced with -DVECTOR_BYTES, all with -march=native) and once
as the package builds it (the width this CPU's registers have). Each build runs the phase neuron (T = 8, 2 grains,
unsigned and signed digits) on the same 64 Ki float32 values in chunks of 8 sites × 8192 samples, the shape of the
fit's chunks, on one thread; the builds take turns, `--repeats` times, and each keeps its fastest time. Every build's
output is checked to be the package build's, bit for bit. Writes bench/results/neuron_kernel.json.

    PYTHONPATH=. python bench/neuron_kernel.py [--repeats 5] [--calls 200]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from spikecompile.devices import cpu_info
from spikecompile.neuron import base2_params, kernel, phase_quantize

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "neuron_kernel.json"
WIDTHS = (16, 32, 64)


def build(folder: Path, extra: list[str]) -> ctypes.CDLL:
    try:
        return kernel.build_variant(folder / f"neuron{len(list(folder.iterdir()))}.so", extra)
    except RuntimeError as error:
        raise SystemExit(f"error: {error}") from None


def timed(library, x: torch.Tensor, neuron, calls: int) -> tuple[float, torch.Tensor]:
    """Seconds per call of phase_quantize with `library` as the kernel, and its output."""
    kernel._state["library"] = library
    out = phase_quantize(x, neuron)
    start = time.perf_counter()
    for _ in range(calls):
        phase_quantize(x, neuron)
    return (time.perf_counter() - start) / calls, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(8, 8192, generator=torch.Generator().manual_seed(0))
    neurons = {"unsigned": base2_params(torch.full((8,), 3.0), 8, 2)}
    neurons["signed digits"] = dataclasses.replace(neurons["unsigned"], signed_digits=True)
    with tempfile.TemporaryDirectory() as folder:
        builds = {"package build": build(Path(folder), [])}
        builds.update({f"{width}-byte vectors": build(Path(folder), [f"-DVECTOR_BYTES={width}"]) for width in WIDTHS})
        best = {(name, kind): float("inf") for name in builds for kind in neurons}
        for _ in range(args.repeats):
            for kind, neuron in neurons.items():
                expected = None
                for name, library in builds.items():
                    seconds, out = timed(library, x, neuron, args.calls)
                    expected = out if expected is None else expected
                    if not torch.equal(out.view(torch.int32), expected.view(torch.int32)):
                        raise SystemExit(f"error: {name} gave other bits than the package build ({kind})")
                    best[name, kind] = min(best[name, kind], seconds)
    kernel._reset()
    elements = x.numel() * 8  # element-steps per call
    report = {"cpu": cpu_info("model name") or platform.processor(), "flags_avx512f": "avx512f" in cpu_info("flags"),
              "flags_avx2": "avx2" in cpu_info("flags"), "torch_threads": 1, "elements": x.numel(), "T": 8,
              "runs": [{"build": name, "neuron": kind, "ms_per_call": 1e3 * seconds,
                        "ns_per_element_step": 1e9 * seconds / elements} for (name, kind), seconds in best.items()]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['cpu']}: phase neuron, T = 8, 64 Ki float32 values a call, one thread (fastest of {args.repeats})")
    for run in report["runs"]:
        print(f"  {run['build']:18s} {run['neuron']:14s} {run['ms_per_call']:8.3f} ms  "
              f"{run['ns_per_element_step']:7.3f} ns per element-step")


if __name__ == "__main__":
    main()
