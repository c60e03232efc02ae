"""IR foundations: tensor types, weight references, and the node base class with its registry.

Every node type is a frozen, keyword-only dataclass deriving from IRNode (decorated with @node_type); defining
the class registers it in NODE_TYPES under its class name, and the reader looks types up there and nowhere
else. A node's docstring is its spec: the decoded equation and the event rule (docs/method.md §3). In event form
an activation travels as T per-step tensors x_0..x_{T−1} whose sum is its value; X_t = x_0 + … + x_t is the
running sum. A node names its input ports (`inputs`) and has one output, which may feed many consumers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from ..checks import is_count  # noqa: F401  (the IR's node modules import it from here)
from ..errors import SpikecompileError

Dim = int | str  # a size, or a symbol such as "seq" for a size known only at run time
NODE_TYPES: dict[str, type[IRNode]] = {}


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < float("inf")


def in_range(value, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> bool:
    """A finite number in the interval between low and high, each end closed unless said open."""
    return (is_number(value) and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high))


MAX_TIMESTEPS = 1024
"""The most steps a node may run: convert builds 4..16 and the codings' unrolled counts stay far below; a larger T
in a file is damage, and every backend loops over T."""
MAX_INDEX = 2**31
"""Positions and token ids stay below 2³¹ (int32 indices, as every tokenizer and RoPE table uses)."""


# canonical dtype names ("float32", not "float") → dtypes, read once from torch's namespace: a name from a file is
# only ever looked up here
DTYPES = {str(value).removeprefix("torch."): value for value in vars(torch).values() if isinstance(value, torch.dtype)}


def torch_dtype(name: str) -> torch.dtype:
    require(isinstance(name, str) and name in DTYPES,
            f"unknown dtype {name!r} (expected a torch dtype name such as 'float32')")
    return DTYPES[name]


def require_tensor(value, field: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    """`value` is a tensor of this shape, of this dtype (or, when dtype is None, floating point)."""
    fits = (isinstance(value, Tensor) and tuple(value.shape) == tuple(shape)
            and (value.dtype == dtype if dtype is not None else value.is_floating_point()))
    got = f"{value.dtype} {list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
    require(fits, f"{field} must be a {dtype or 'float'} tensor of shape {list(shape)}, got {got}")


@dataclasses.dataclass(frozen=True)
class TensorType:
    """The type of the tensor on an edge: its shape (sizes and symbols) and dtype name."""

    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self):
        require(isinstance(self.shape, tuple) and all(is_count(dim, 0) or (isinstance(dim, str) and dim)
                                                      for dim in self.shape),
                f"shape must be a tuple of sizes ≥ 0 and non-empty symbols, got {self.shape!r}")
        torch_dtype(self.dtype)

    @property
    def is_float(self) -> bool:
        return torch_dtype(self.dtype).is_floating_point

    def __str__(self) -> str:
        return f"[{', '.join(map(str, self.shape))}] {self.dtype}"


class TensorStore(Protocol):
    """Where TensorRefs point: any mapping from names to tensors (a dict, a model's state_dict(), ...)."""

    def __getitem__(self, name: str) -> Tensor: ...


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor held in a TensorStore under `name` (e.g. the state_dict key
    "model.layers.0.mlp.down_proj.weight"): the IR names weights, it never copies them."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self):
        require(isinstance(self.name, str) and self.name, f"a tensor name must be a non-empty str, got {self.name!r}")
        require(isinstance(self.shape, tuple) and all(is_count(dim, 0) for dim in self.shape),
                f"tensor {self.name}: shape must be a tuple of sizes ≥ 0, got {self.shape!r}")
        torch_dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        """The tensor's size in bytes, in its own dtype."""
        return math.prod(self.shape) * torch_dtype(self.dtype).itemsize

    def resolve(self, store: TensorStore) -> Tensor:
        """The tensor itself; SpikecompileError if the store lacks it or holds another shape or dtype."""
        try:
            tensor = store[self.name]
        except KeyError:
            raise SpikecompileError(f"tensor {self.name}: not in the tensor store") from None
        self.check(tuple(tensor.shape), tensor.dtype)
        return tensor

    def check(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """SpikecompileError unless a stored tensor of this shape and dtype is the one the graph expects."""
        if tuple(shape) != self.shape or dtype != torch_dtype(self.dtype):
            raise SpikecompileError(f"tensor {self.name}: the store holds {dtype} {list(shape)}, "
                                    f"the graph expects {self.dtype} {list(self.shape)}")

    def __str__(self) -> str:
        return f"{self.name} [{', '.join(map(str, self.shape))}] {self.dtype}"


node_type = dataclasses.dataclass(frozen=True, kw_only=True, eq=False)


@node_type
class IRNode:
    """Base of every node type.

    timesteps: the number of steps T the node runs in event form (None until a pass sets it). An edge joins
    nodes that run the same T, except into a node that `integrates_input` (it reads its whole input window
    before emitting its own T steps: a phase neuron).
    """

    inputs: ClassVar[tuple[str, ...]] = ("x",)
    integrates_input: ClassVar[bool] = False
    timesteps: int | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__name__ in NODE_TYPES:
            raise TypeError(f"IR node type {cls.__name__} is defined twice")
        NODE_TYPES[cls.__name__] = cls

    def __post_init__(self):
        try:
            require(self.timesteps is None or (is_count(self.timesteps) and self.timesteps <= MAX_TIMESTEPS),
                    f"timesteps must be None or an int in 1..{MAX_TIMESTEPS}, got {self.timesteps!r}")
            self.check()
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from None

    def check(self) -> None:
        """Raise ValueError if the fields are inconsistent (runs on construction)."""

    def tensor_refs(self) -> dict[str, TensorRef]:
        """The node's TensorRefs (the weights it names), by field name."""
        return {field.name: value for field in dataclasses.fields(self)
                if isinstance(value := getattr(self, field.name), TensorRef)}

    def infer(self, inputs: dict[str, TensorType]) -> TensorType:
        """The output type for these input types (one per port); ValueError if they do not fit the node."""
        return inputs["x"]

    @classmethod
    def example(cls) -> tuple[IRNode, dict[str, TensorType]]:
        """A small valid instance and input types it accepts (documentation, and the round-trip tests)."""
        raise NotImplementedError(f"{cls.__name__}.example")


def same_type(inputs: dict[str, TensorType]) -> TensorType:
    """The common type of all inputs (elementwise nodes); ValueError if they differ."""
    first, *rest = inputs.values()
    require(all(other == first for other in rest),
            "inputs differ: " + ", ".join(f"{port} {value}" for port, value in inputs.items()))
    return first
