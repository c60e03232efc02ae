"""The Lava backend (Loihi 2 simulation): emit a self-contained Lava program for the whole model, decoder layers or
one block, and run it. Emitting needs no lava; running needs lava-nc 0.10.0 (scripts/install.sh).

    build_lava(result, folder, layers=None, block=None, tokens=4, seed=0) -> report     emit.py
    run_program(folder, tag="floating_pt", inputs=None) -> result                        runtime/program.py
    runtime/     compat.py, processes.py, program.py: copied verbatim into every program (numpy + lava only)
    OPTIONS, check, check_record, build (= build_lava), report_lines     `spikecompile build --target lava`
                                                                          (backends/README.md)

The fixed-point formats (8-bit weights + exponent, 24-bit potentials) belong to the Loihi 2 target and live in
spikecompile.hardware.loihi2; the mapping pass (passes.loihi_mapping) checks a model against the same formats.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from spikecompile.data import load_text
from spikecompile.errors import SpikecompileError
from spikecompile.hardware.loihi2 import load_loihi2
from spikecompile.passes.deployment import summary_lines

from ..options import BY_TARGET, parse_options
from .emit import build_lava

INSTALL = ("the Lava backend runs programs with lava-nc 0.10.0: run scripts/install.sh (its dependencies, then "
           "pip install --no-deps --ignore-requires-python lava-nc==0.10.0)")


def run_program(folder, tag: str = "floating_pt", inputs=None) -> dict:
    """Run an emitted program in this process (runtime.program.run); SpikecompileError if lava is missing."""
    if importlib.util.find_spec("lava") is None:
        raise SpikecompileError(INSTALL)
    from .runtime import program

    return program.run(folder, tag, inputs)


OPTIONS = BY_TARGET["lava"]
build = build_lava


def check(options: dict) -> dict:
    """The options, --layers parsed into its layer indices; --block with more than one layer refused."""
    parsed = parse_options(OPTIONS, options)
    if parsed["text"] is not None:
        parsed["text"] = load_text(parsed["text"], split="eval")
    parsed["loihi2_target"] = load_loihi2(parsed["loihi2_target"])
    layers, block = parsed["layers"], parsed["block"]
    if block and layers and len(layers) > 1:
        raise SpikecompileError(f"--block {block} --layers {layers[0]}-{layers[-1]}: a block is cut from one layer; "
                                f"give --layers N")
    return parsed


def check_record(record: dict, options: dict) -> None:
    """--layers against model.pt's site table (its decoder layers), before the source model loads."""
    layers = options.get("layers")
    present = sorted({entry.get("layer") for entry in record["sites"].values()} - {None})
    if layers and present and layers[-1] > present[-1]:
        given = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"{layers[0]}"
        raise SpikecompileError(f"--layers {given}: the model has decoder layers {present[0]}..{present[-1]}")


def report_lines(report: dict, folder: str | Path) -> list[str]:
    """The deployment report (formats, headroom, saturations, perplexity), what was emitted, its size, and how
    to run it."""
    return [*summary_lines(report["deployment"]),
            f"wrote the Lava program of the {report['part']} to {folder} ({report['bytes'] / 2**20:.1f} MiB); "
            f"run it with: python {folder}/run.py [--tag fixed_pt]"]


__all__ = ["INSTALL", "OPTIONS", "build", "build_lava", "check", "report_lines", "run_program"]
