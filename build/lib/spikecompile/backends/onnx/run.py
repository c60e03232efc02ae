"""Run an exported model in onnxruntime (CPU): feeds by input name, outputs by name as numpy arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import torch


def session(model: str | Path | bytes, threads: int | None = None) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session of the model at this path (or serialized); threads: intra-op threads (None:
    onnxruntime's default; 1 makes the summation order, and so the results, independent of the machine)."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: a KV prefix input with a default value is a warning by design
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                        providers=["CPUExecutionProvider"])


def run(model: str | Path | onnxruntime.InferenceSession, inputs: dict, outputs: list[str] | None = None,
        threads: int | None = None) -> dict[str, np.ndarray]:
    """Run `model` (a path or a session) on `inputs` (by input name: numpy arrays or tensors; a KV prefix cache
    left out takes its stored value); return the outputs by name (all, or those listed)."""
    model = model if isinstance(model, onnxruntime.InferenceSession) else session(model, threads)
    feeds = {name: value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
             for name, value in inputs.items()}
    names = outputs or [output.name for output in model.get_outputs()]
    return dict(zip(names, model.run(names, feeds), strict=True))
