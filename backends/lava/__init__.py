"""The Lava backend (Loihi 2 simulation): emit a self-contained Lava program for the whole model, decoder layers or
one block, and run it. Emitting needs no lava; running needs lava-nc 0.10.0 (scripts/install.sh).

    build_lava(result, folder, layers=None, block=None, tokens=4, seed=0) -> report     emit.py
    run_program(folder, tag="floating_pt", inputs=None) -> result                        runtime/program.py
    runtime/     compat.py, processes.py, program.py: copied verbatim into every program (numpy + lava only)

The fixed-point formats (8-bit weights + exponent, 24-bit potentials) belong to the Loihi 2 target and live in
spikecompile.hardware.loihi2; the mapping pass (passes.loihi_mapping) checks a model against the same formats.
"""

from __future__ import annotations

import importlib.util

from spikecompile.errors import SpikecompileError

from .emit import build_lava

INSTALL = ("the Lava backend runs programs with lava-nc 0.10.0: run scripts/install.sh (its dependencies, then "
           "pip install --no-deps --ignore-requires-python lava-nc==0.10.0)")


def run_program(folder, tag: str = "floating_pt", inputs=None) -> dict:
    """Run an emitted program in this process (runtime.program.run); SpikecompileError if lava is missing."""
    if importlib.util.find_spec("lava") is None:
        raise SpikecompileError(INSTALL)
    from .runtime import program

    return program.run(folder, tag, inputs)


__all__ = ["INSTALL", "build_lava", "run_program"]
