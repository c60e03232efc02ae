"""An IR node as a self-contained JSON record: its graph.json entry (spikecompile.ir.serialize) with the tensors
the node owns (neuron bases, RoPE frequencies, rotation signs) written inline, so one JSON text rebuilds it.

    {"name": "layers.0.silu", "type": "PhaseNeuron", "fields": {..., "tau": {"tensor": "layers.0.silu.tau"}},
     "tensors": {"layers.0.silu.tau": {"dtype": "float32", "shape": [], "values": [0.75]}, ...}}

Values are exact: a float32 read as a Python float and written by json is the same float32 when read back.
Tensors the node names by TensorRef (the model's weights) are not in the record.
"""

from __future__ import annotations

import torch

from ...ir import IRNode
from ...ir.base import torch_dtype
from ...errors import SpikecompileError
from ...ir.serialize import decode_node, encode_fields, first_line


def describe(name: str, node: IRNode) -> dict:
    """The record of IR node `name`."""
    tensors = {}
    fields = encode_fields(node, name, tensors)
    return {"name": name, "type": type(node).__name__, "fields": fields,
            "tensors": {key: {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
                              "values": tensor.reshape(-1).tolist()} for key, tensor in tensors.items()}}


def rebuild(record: dict) -> IRNode:
    """The IR node a record describes; SpikecompileError naming the node if the record is not valid."""
    try:
        tensors = {key: _tensor(key, entry) for key, entry in record["tensors"].items()}
    except ValueError as error:
        raise SpikecompileError(f"node {record['name']}: {error}") from None
    return decode_node(record, tensors)


def _tensor(key: str, entry: dict) -> torch.Tensor:
    """A tensor from its record; ValueError naming it if the values do not fit the dtype or the shape."""
    try:
        return torch.tensor(entry["values"], dtype=torch_dtype(entry["dtype"])).reshape(entry["shape"])
    except (RuntimeError, TypeError, OverflowError) as error:  # torch's errors on such values: a reshape's, ...
        raise ValueError(f"tensor {key}: {first_line(error)}") from None
