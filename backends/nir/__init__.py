"""The NIR backend: an IR graph → standard NIR files (nir ≥ 1.0.8, HDF5) that stock `nir.read` loads.

Every node NIR can express exactly becomes stock NIR nodes — a phase neuron unrolled over its T steps into
Threshold / Scale nodes with summing edges, a synapse an Affine or Linear — tagged with metadata from which our
reader rebuilds the IR node. Connected runs of such nodes form the segments (one .nir file each); everything NIR
cannot express (norms, softmax, SiLU, activation products, rotations, RoPE, head reshapes, the KV prefix, the
embedding) is described in manifest.json, which also stitches the segments together, and fidelity.json says for
every node whether it is exact, approximated or not expressible in NIR. The encoding is in lower.py.

    lower           one lowering per IR node type NIR expresses (LOWERINGS), the reason for every other
                    (NOT_EXPRESSIBLE)
    export          export (IR graph → folder) and build_nir (the `spikecompile build --target nir` entry point)
    reader          read (folder → IR graph and weights), open_export; a clear error for NIR files of other tools
    schema          the schema of manifest.json (pydantic), checked when an export is opened
    run             run: an export executed with any NIR consumer for the segments and our interpreter for the rest
    reference_data  write_reference_trace: the reference values and spike trains of an export as NIRGraphData

`spikecompile build --target nir` uses OPTIONS, check, build (= build_nir) and report_lines (backends/README.md).
"""

from pathlib import Path

from ...errors import SpikecompileError

try:
    import nir  # noqa: F401
except ImportError:
    raise SpikecompileError("the nir backend needs the nir extra: pip install 'spikecompile[nir]'") from None

from ..options import BY_TARGET, parse_options
from .export import build_nir, export
from .reader import open_export, read
from .reference_data import write_reference_trace
from .run import run

OPTIONS = BY_TARGET["nir"]
build = build_nir


def check(options: dict) -> dict:
    """The options as given (strict, approximate: flags); nir itself was checked when this package loaded."""
    return parse_options(OPTIONS, options)


def report_lines(fidelity: dict, folder: str | Path) -> list[str]:
    """How many nodes are exact, approximated or not expressible in NIR, and how many have no rule."""
    counts = ", ".join(f"{count} {kind}" for kind, count in fidelity["counts"].items())
    unsupported = fidelity["unsupported"]
    return [f"wrote NIR to {folder}: {counts}"
            + (f"; no rule for {len(unsupported)} nodes (fidelity.json)" if unsupported else "")]


__all__ = ["OPTIONS", "build", "build_nir", "check", "export", "open_export", "read", "report_lines", "run",
           "write_reference_trace"]
