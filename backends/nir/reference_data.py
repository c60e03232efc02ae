"""A reference trace of an export, for others to check their run of it: NIRGraphData (nir.write_data) holding what
the decoded reference (ir.evaluate) computes on given inputs, keyed by the segments' NIR node names:

    input.<V>, output.<V>   "value"   the IR value V                                  [samples, 1, width] float32
    <neuron N>              "spikes"  N's signed spike train σ·s_t, one step per phase [samples, T, width] int8
                            "value"   N's output x̂                                    [samples, 1, width] float32

samples are the value's leading dims (batch, tokens, ...) flattened; dt = 1. In the unrolled encoding (lower.py)
spikes[:, t] is the output of N.pos.spike{t} minus that of N.neg.spike{t}.
"""

from __future__ import annotations

from pathlib import Path

import nir
import torch
from torch import Tensor

from ...files import atomic_write
from ...ir import PhaseNeuron, evaluate
from ...neuron import phase_encode
from .export import write_hdf5
from .reader import graph_of, open_export

TRACE_FILE = "reference_trace.h5"


@torch.no_grad()
def write_reference_trace(folder: str | Path, inputs: dict[str, Tensor]) -> Path:
    """Write the reference trace of the export in `folder` on these graph inputs (by Input name) to
    folder/reference_trace.h5; its path."""
    export = open_export(folder)
    graph, store = graph_of(export)
    values = evaluate(graph, store, inputs)
    observed = {}
    for step in export.manifest["steps"]:
        if "segment" not in step:
            continue
        observed.update({f"input.{value}": _node_data(value=values[value]) for value in step["inputs"]})
        observed.update({f"output.{value}": _node_data(value=values[value]) for value in step["outputs"]})
        for name in step["nodes"]:
            if isinstance(graph[name], PhaseNeuron):
                params = graph[name].params()
                sign, spikes = phase_encode(values[graph.inputs(name)["x"]], params)
                train = spikes if params.signed_digits else sign * spikes  # signed digits carry their sign
                observed[name] = _node_data(value=values[name], spikes=train.to(torch.int8))
    path = Path(folder) / TRACE_FILE
    data = nir.NIRGraphData(nodes=observed)
    atomic_write(path, lambda temp: write_hdf5(temp, lambda stream: nir.write_data(stream, data)))
    return path


def _node_data(value: Tensor, spikes: Tensor | None = None) -> nir.NIRNodeData:
    """value [..., width] → [samples, 1, width]; spikes [T, ..., width] → [samples, T, width]."""
    width = value.shape[-1]
    observables = {"value": nir.TimeGriddedData(value.reshape(-1, 1, width).float().numpy(), dt=1.0)}
    if spikes is not None:
        steps = spikes.reshape(spikes.shape[0], -1, width).transpose(0, 1).contiguous()
        observables["spikes"] = nir.TimeGriddedData(steps.numpy(), dt=1.0)
    return nir.NIRNodeData(observables=observables)
