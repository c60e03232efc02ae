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
from ...ir.serialize import decode_node, encode_fields


def describe(name: str, node: IRNode) -> dict:
    """The record of IR node `name`."""
    tensors = {}
    fields = encode_fields(node, name, tensors)
    return {"name": name, "type": type(node).__name__, "fields": fields,
            "tensors": {key: {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
                              "values": tensor.reshape(-1).tolist()} for key, tensor in tensors.items()}}


def rebuild(record: dict) -> IRNode:
    """The IR node a record describes; SpikecompileError naming the node if the record is not valid."""
    tensors = {key: torch.tensor(entry["values"], dtype=torch_dtype(entry["dtype"])).reshape(entry["shape"])
               for key, entry in record["tensors"].items()}
    return decode_node(record, tensors)
