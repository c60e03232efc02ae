"""GraphBuilder: collects the ONNX nodes, initializers, inputs and outputs of one exported form.

Every value an IR node produces is named after the IR node; the helper values a lowering needs are named
"<IR node>/<op><k>", and every ONNX node "<IR node>/<op><k>" too, so Netron or onnx.helper shows which IR node
each part belongs to. Initializers are the store's tensors under their TensorRef names (one copy per name, so
a tied weight is stored once), derived tensors under names the lowering gives, and small constants shared by
value ("const/<k>").
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ...errors import SpikecompileError
from ...ir import TensorRef, TensorStore, TensorType
from ...ir.base import torch_dtype

ELEMENT_TYPES = {
    torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE, torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
    torch.int8: TensorProto.INT8, torch.bool: TensorProto.BOOL,
}


def element_type(dtype: torch.dtype | str) -> int:
    """The ONNX element type of a torch dtype (or of its IR name such as "float32")."""
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    if dtype not in ELEMENT_TYPES:
        raise SpikecompileError(f"dtype {dtype}: the onnx backend handles {', '.join(map(str, ELEMENT_TYPES))}")
    return ELEMENT_TYPES[dtype]


def tensor_proto(name: str, tensor: torch.Tensor) -> TensorProto:
    """`tensor` as an initializer, its bytes copied raw (little-endian, as ONNX stores them): any dtype of
    ELEMENT_TYPES, bfloat16 included, without a round trip through numpy's types."""
    tensor = tensor.detach().cpu().contiguous()
    raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return helper.make_tensor(name, element_type(tensor.dtype), list(tensor.shape), raw, raw=True)


def value_info(name: str, of: TensorType, leading: tuple[int | str, ...] = ()) -> onnx.ValueInfoProto:
    """A graph input or output of IR type `of` (symbols such as "seq" become dynamic dims), after `leading` dims."""
    return helper.make_tensor_value_info(name, element_type(of.dtype), [*leading, *of.shape])


class GraphBuilder:
    """scope: the IR node being lowered (the prefix of every name made meanwhile). place: applied to every
    initializer as it is made (export.ExternalData.place: its bytes go to the data file at once), or None."""

    def __init__(self, store: TensorStore, place: Callable[[TensorProto], TensorProto] | None = None):
        self.store = store
        self._place = place or (lambda proto: proto)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.scope = ""
        self.taken: set[str] = set()  # every value name so far: ONNX graphs are in single static assignment
        self._counts: collections.Counter = collections.Counter()
        self._derived: dict[tuple, str] = {}  # (element type, shape, bytes) → initializer name

    def fresh(self, what: str) -> str:
        """A new name "<scope>/<what><k>"."""
        key = f"{self.scope}/{what}"
        self._counts[key] += 1
        return f"{key}{self._counts[key]}"

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attributes) -> str:
        """Append one node with these inputs ("" for an omitted optional one); return its output's name."""
        output = output or self.fresh(op_type.lower())
        self.taken.add(output)
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=self.fresh(op_type), **attributes))
        return output

    def name_output(self, value: str, name: str) -> str:
        """Rename `value` to `name` if the last node made it in this scope (so nothing reads it yet) and no other
        value (a graph input, an initializer) is called `name`; return the value's name."""
        last = self.nodes[-1].output if self.nodes else []
        if value not in last or not value.startswith(f"{self.scope}/") or name in self.taken:
            return value
        last[list(last).index(value)] = name
        self.taken.add(name)
        return name

    def ops(self, op_type: str, *inputs: str, count: int, **attributes) -> list[str]:
        """Append one node with `count` outputs (Split); return their names."""
        outputs = [self.fresh(op_type.lower()) for _ in range(count)]
        self.taken.update(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=self.fresh(op_type), **attributes))
        return outputs

    def weight(self, ref: TensorRef) -> str:
        """The store's tensor `ref` as an initializer named ref.name (shape and dtype checked by resolve)."""
        if ref.name not in self.initializers:
            self._claim(ref.name)
            self.initializers[ref.name] = self._place(tensor_proto(ref.name, ref.resolve(self.store)))
        return ref.name

    def tensor(self, name: str, tensor: torch.Tensor) -> str:
        """A derived tensor (a rotation matrix, RoPE frequencies, a neuron's step values) as an initializer named
        `name`; a tensor equal to one made before (same dtype, shape and bytes) is that one, stored once."""
        proto = tensor_proto(name, tensor)
        key = (proto.data_type, tuple(proto.dims), proto.raw_data)
        if key not in self._derived:
            self._claim(name)
            self.initializers[name] = self._place(proto)
            self._derived[key] = name
        return self._derived[key]

    def constant(self, values, dtype: torch.dtype) -> str:
        """A small constant (a shape, an axis list, a scalar), named "const/<k>" and shared by value."""
        return self.tensor(f"const/{len(self._derived) + 1}", torch.as_tensor(np.asarray(values), dtype=dtype))

    def input(self, name: str, of: TensorType) -> None:
        """Declare a graph input of IR type `of`."""
        self._claim(name)
        self.inputs.append(value_info(name, of))

    def _claim(self, name: str) -> None:
        if name in self.taken:
            raise SpikecompileError(f"onnx value {name}: two different values under one name (an IR node, a tensor or "
                                    f"an input share it); ONNX needs distinct names")
        self.taken.add(name)

    def ints(self, *values: int) -> str:
        """A 1-D int64 constant (axes, shapes, pads)."""
        return self.constant(list(values), torch.int64)
