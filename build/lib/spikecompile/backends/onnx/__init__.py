"""The ONNX backend: the spiking model as standard ONNX graphs (opset 17) that onnxruntime, or any runtime users
already deploy with, runs; lowered from the IR, never by re-tracing the model.

    export        export / build_onnx (the `spikecompile build --target onnx` entry point), to_onnx, check_form
    lower         one lowering per IR node type (LOWERINGS) for both forms: decoded and event
    builder       GraphBuilder: nodes, initializers (the store's tensors under their names), inputs and outputs
    run           session / run: execute an export in onnxruntime (CPU)
    check         teacher_forced / agreement: an export cut open at every neuron, checked node by node against the
                  simulator's values (free-running float32 executors drift apart at the first flipped spike)

Needs the onnx extra (onnx, onnxruntime, ml_dtypes < 0.6: a newer ml_dtypes needs numpy 2, which Lava cannot use).
"""

from ...errors import SpikecompileError

try:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
except ImportError:
    raise SpikecompileError("the onnx backend needs the onnx extra: pip install 'spikecompile[onnx]'") from None

from .check import agreement, teacher_forced
from .export import OPSET, build_onnx, check_form, export, to_onnx
from .lower import LOWERINGS
from .run import run, session

__all__ = ["LOWERINGS", "OPSET", "agreement", "build_onnx", "check_form", "export", "run", "session", "teacher_forced",
           "to_onnx"]
