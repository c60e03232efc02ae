"""The ONNX backend: the spiking model as standard ONNX graphs (opset 17) that onnxruntime, or any runtime users
already deploy with, runs; lowered from the IR, never by re-tracing the model.

    export        export / build_onnx (the `spikecompile build --target onnx` entry point), to_onnx, check_form
    lower         one lowering per IR node type (LOWERINGS) for both forms: decoded and event
    builder       GraphBuilder: nodes, initializers (the store's tensors under their names), inputs and outputs
    run           session / run: execute an export in onnxruntime (CPU)
    check         teacher_forced / agreement: an export cut open at every neuron, checked node by node against the
                  simulator's values (free-running float32 executors drift apart at the first flipped spike)

`spikecompile build --target onnx` uses OPTIONS, check, build and report_lines (backends/README.md).

Needs the onnx extra (onnx, onnxruntime, ml_dtypes < 0.6: a newer ml_dtypes needs numpy 2, which Lava cannot use).
"""

from pathlib import Path

from ...errors import SpikecompileError

try:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
except ImportError:
    raise SpikecompileError("the onnx backend needs the onnx extra: pip install 'spikecompile[onnx]'") from None

from .. import BuildResult
from ..options import BY_TARGET, parse_options
from .check import agreement, teacher_forced
from .export import OPSET, build_onnx, check_form, export, to_onnx
from .lower import LOWERINGS
from .run import run, session

OPTIONS = BY_TARGET["onnx"]


def check(options: dict) -> dict:
    """The options, the form checked (onnx and onnxruntime were checked when this package loaded)."""
    parsed = parse_options(OPTIONS, options)
    check_form(parsed["onnx_form"])
    return parsed


def build(result: BuildResult, folder: str | Path, *, onnx_form: str = "both", spike_outputs: bool = False,
          progress: bool = True) -> dict:
    """build_onnx under the option names of `spikecompile build`."""
    return build_onnx(result, folder, onnx_form, spike_outputs, progress)


def report_lines(report: dict, folder: str | Path) -> list[str]:
    """Each form's file, ONNX nodes and size, then what was written."""
    lines = []
    for entry in report["forms"].values():
        extra = f", weights in {entry['data']}" if entry["data"] else ""
        lines.append(f"  {entry['file']}: {entry['nodes']} ONNX nodes, {entry['bytes'] / 2**20:.1f} MiB{extra}")
    lines.append(f"wrote {folder}: ONNX opset {report['opset']}, {', '.join(report['forms'])} form(s), onnx.json")
    return lines


__all__ = ["LOWERINGS", "OPSET", "OPTIONS", "agreement", "build", "build_onnx", "check", "check_form", "export",
           "report_lines", "run", "session", "teacher_forced", "to_onnx"]
