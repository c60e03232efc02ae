"""The IR on disk: a folder holding graph.json and tensors.safetensors.

graph.json (UTF-8; one node or edge per line):

    {"format": "spikecompile.ir", "format_version": 3, "tensors_sha256": "<sha256 of tensors.safetensors>",
     "nodes": [{"name": "layers.0.mlp.gate_proj", "type": "Linear", "fields": {"timesteps": null, ...}}, ...],
     "edges": [["layers.0.mlp_norm_site", "layers.0.mlp.gate_proj", null], ...]}

Nodes are listed in graph order, edges as [producer, consumer, port]. "type" is a node class name
(NODE_TYPES) and "fields" holds all of its dataclass fields, written by declared type: numbers, strings,
booleans, null and dicts as themselves, tuples as arrays, a TensorRef or TensorType as an object of its
fields, and a node-owned tensor (neuron bases, rotation signs, ...) as {"tensor": "<node name>.<field>"}, its
key in tensors.safetensors. Tensors a TensorRef names (the model's weights) go to weights.safetensors, under
their store keys, only when write() is given the store; the header then holds "weights_sha256", and
read_weights() gives them back (checked against the graph's refs).

Every field is required, nested ones (a TensorRef's name, shape, dtype) included: the writer writes them all, a
null where the field may be None, so a missing field is a damaged file and is refused, never defaulted. The only
optional key is the header's "weights_sha256" (absent: written without the weights).

Reading parses JSON and safetensors only (never pickle, never code), finds node classes in NODE_TYPES only, and
validates the graph (each node type's own checks, ranges included, run on construction); any failure is one
SpikecompileError line naming the file and the node and field at fault. Writing
is deterministic (the same graph gives the same bytes) and atomic per file, tensors first: a graph.json next to
tensors from another write is caught by the sha256.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..errors import SpikecompileError
from ..files import atomic_write, file_sha256, read_document, write_safetensors
from ..progress import bar
from .base import NODE_TYPES, IRNode, TensorStore, require, torch_dtype
from .graph import Graph, tensor_refs, validate

FORMAT = "spikecompile.ir"
FORMAT_VERSION = 4  # 2: PhaseNeuron carries v0 and max_spikes; 3: and signed_digits; 4: and token_levels
GRAPH_FILE = "graph.json"
TENSORS_FILE = "tensors.safetensors"
WEIGHTS_FILE = "weights.safetensors"


def write(graph: Graph, folder: str | Path, store: TensorStore | None = None, progress: bool = False) -> None:
    """Validate `graph` and write it to `folder` (created if absent; its files replaced), with the weights its
    TensorRefs name when `store` is given, read from it one at a time (progress: a bar per tensor on a terminal)."""
    validate(graph)
    tensors: dict[str, Tensor] = {}
    nodes = [{"name": name, "type": type(graph[name]).__name__, "fields": encode_fields(graph[name], name, tensors)}
             for name in graph]
    tensor_bytes = safetensors.torch.save(tensors)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "tensors_sha256": hashlib.sha256(tensor_bytes).hexdigest()}
    folder = Path(folder)
    try:
        folder.mkdir(exist_ok=True)
    except OSError as error:
        raise SpikecompileError(f"{folder}: cannot create the graph folder ({error.strerror})") from None
    atomic_write(folder / TENSORS_FILE, lambda temp: Path(temp).write_bytes(tensor_bytes))
    if store is not None:  # one tensor at a time, in the store's dtypes: the weights are never in memory together
        refs = tensor_refs(graph)
        layout = {key: (ref.shape, torch_dtype(ref.dtype)) for key, ref in refs.items()}
        digest = {}
        with bar(total=len(layout), desc="ir weights", unit="tensor", progress=progress) as written:
            def tensor_of(key: str) -> Tensor:
                written.update()
                return refs[key].resolve(store)

            atomic_write(folder / WEIGHTS_FILE, lambda temp: digest.setdefault(
                "sha256", write_safetensors(temp, layout, tensor_of)))
        header["weights_sha256"] = digest["sha256"]
    text = json_text(header, {"nodes": nodes, "edges": [list(edge) for edge in graph.edges()]})
    atomic_write(folder / GRAPH_FILE, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def read_weights(folder: str | Path, graph: Graph) -> WeightsFile:
    """The weights written beside `graph` (read from `folder`), every TensorRef of the graph checked: a mapping that
    reads each tensor from the file when it is asked for (a 7B IR's weights are never in memory together)."""
    folder = Path(folder)
    document = read_document(folder / GRAPH_FILE, "IR graph", FORMAT, FORMAT_VERSION,
                              "build the graph again with this version")
    try:  # hashed in blocks: the file is never held whole
        digest = file_sha256(folder / WEIGHTS_FILE)
    except OSError as error:
        raise SpikecompileError(f"{folder}: cannot read {WEIGHTS_FILE} ({error.strerror}); build with the weights "
                                f"(spikecompile build -o)") from None
    if digest != document.get("weights_sha256"):
        raise SpikecompileError(f"{folder}: {WEIGHTS_FILE} does not belong to this {GRAPH_FILE} (sha256 differs); "
                                f"build again")
    try:
        weights = WeightsFile(folder / WEIGHTS_FILE)
        for ref in tensor_refs(graph).values():  # checked against the file's header: the sha256 above vouches for
            if ref.name not in weights:          # the bytes, so no tensor is read here
                raise SpikecompileError(f"tensor {ref.name}: not in the tensor store")
            ref.check(*weights.header(ref.name))
    except SpikecompileError as error:
        raise SpikecompileError(f"{folder / WEIGHTS_FILE}: {error}") from None
    except (SafetensorError, ValueError, RuntimeError, OSError) as error:  # safetensors' errors besides its own
        raise SpikecompileError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({first_line(error)})"
                                ) from None
    return weights


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
"""The safetensors header's dtype names (its format's spec) of the dtypes an IR holds."""


class WeightsFile(Mapping):
    """The tensors of a safetensors file, each read from it (safe_open) when asked for."""

    def __init__(self, path: Path):
        self.path = path
        self._file = safe_open(path, framework="pt")
        self._keys = set(self._file.keys())

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def header(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """The shape and dtype the file's header gives `key`, read without its bytes (a dtype no IR holds is read
        from the tensor itself)."""
        view = self._file.get_slice(key)
        dtype = SAFETENSORS_DTYPES.get(view.get_dtype())
        if dtype is None:
            return tuple(self[key].shape), self[key].dtype
        return tuple(view.get_shape()), dtype

    def __iter__(self):
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)


def read(folder: str | Path) -> Graph:
    """Read and validate the graph in `folder`."""
    folder = Path(folder)
    document = read_document(folder / GRAPH_FILE, "IR graph", FORMAT, FORMAT_VERSION,
                              "build the graph again with this version")
    try:
        _check_listings(document)
    except ValueError as error:
        raise SpikecompileError(f"{folder / GRAPH_FILE}: {error}; build the graph again") from None
    try:
        tensors = _read_tensors(folder / TENSORS_FILE, document["tensors_sha256"])
    except SpikecompileError as error:
        raise SpikecompileError(f"{folder}: {error}") from None
    try:
        graph = Graph()
        for entry in document["nodes"]:
            graph.add_node(entry["name"], decode_node(entry, tensors))
        for source, target, port in document["edges"]:
            graph.add_edge(source, target, port)
        validate(graph)
    except (SpikecompileError, ValueError) as error:  # ValueError: Graph's own checks (a name empty, or twice)
        raise SpikecompileError(f"{folder / GRAPH_FILE}: {error}") from None
    return graph


def _check_listings(document: dict) -> None:
    """The header's sha256s and the shape of the listings: each node {"name": str, "type": str, "fields": {...}},
    each edge [producer, consumer, port or null]; ValueError naming the first that is not."""
    for key in ("tensors_sha256", "weights_sha256"):
        require(isinstance(document.get(key), str) or (key == "weights_sha256" and key not in document),
                f"{key} must be a sha256 string, got {document.get(key)!r}")
    for key in ("nodes", "edges"):
        require(isinstance(document.get(key), list), f"{key} must be a list, got {type(document.get(key)).__name__}")
    for index, entry in enumerate(document["nodes"]):
        require(isinstance(entry, dict) and entry.keys() == {"name", "type", "fields"}
                and isinstance(entry["name"], str) and isinstance(entry["type"], str)
                and isinstance(entry["fields"], dict),
                f"nodes[{index}] must be {{\"name\": str, \"type\": str, \"fields\": {{...}}}}, got {entry!r:.120}")
    for index, edge in enumerate(document["edges"]):
        require(isinstance(edge, list) and len(edge) == 3 and all(isinstance(end, str) for end in edge[:2])
                and (edge[2] is None or isinstance(edge[2], str)),
                f"edges[{index}] must be [producer, consumer, port or null], got {edge!r:.120}")


def encode_fields(value, key: str, tensors: dict[str, Tensor]):
    """JSON for one field value; a tensor goes to `tensors` under `key` and is written as a reference to it."""
    if isinstance(value, Tensor):
        tensors[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
        return {"tensor": key}
    if dataclasses.is_dataclass(value):
        return {field.name: encode_fields(getattr(value, field.name), f"{key}.{field.name}", tensors)
                for field in dataclasses.fields(value)}
    return list(value) if isinstance(value, tuple) else value


def decode_node(entry: dict, tensors: dict[str, Tensor]) -> IRNode:
    """The node a graph.json entry (or a NIR manifest record) describes; SpikecompileError naming the node."""
    name, type_name = entry["name"], entry["type"]
    cls = NODE_TYPES.get(type_name)
    if cls is None:
        raise SpikecompileError(f"node {name}: unknown node type {type_name!r} (known: {', '.join(NODE_TYPES)})")
    try:
        return _decode_fields(cls, entry["fields"], tensors)
    except (KeyError, TypeError, ValueError) as error:
        raise SpikecompileError(f"node {name}: {error}") from None


def _decode_fields(cls: type, fields: dict, tensors: dict[str, Tensor], where: str = ""):
    """An instance of dataclass `cls` from its JSON object; every field must be there (`where`: the enclosing
    field, for the message)."""
    if not isinstance(fields, dict):
        raise TypeError(f"{where or cls.__name__ + ' fields'} must be a JSON object, got {fields!r:.80}")
    hints = _field_hints(cls)
    unknown = [name for name in fields if name not in hints]
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(map(str, unknown))}")
    missing = [name for name in hints if name not in fields]
    if missing:
        raise ValueError(f"{cls.__name__}{' ' + where if where else ''} lacks field {', '.join(missing)} "
                         f"(every field is required; build the graph again)")
    return cls(**{name: _decode(hints[name], value, tensors, f"{where}.{name}" if where else name)
                  for name, value in fields.items()})


def _decode(hint, value, tensors: dict[str, Tensor], where: str):
    """A field value from its JSON, by the field's declared type (the inverse of encode_fields)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if hint is Tensor:
        if not (isinstance(value, dict) and isinstance(value.get("tensor"), str)):
            raise TypeError(f"{where} must be {{\"tensor\": <key>}}, got {value!r:.80}")
        if value["tensor"] not in tensors:
            raise ValueError(f"tensor {value['tensor']} is not in {TENSORS_FILE}")
        return tensors[value["tensor"]]
    if dataclasses.is_dataclass(hint):
        return _decode_fields(hint, value, tensors, where)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise TypeError(f"{where} must be an array, got {value!r:.80}")
        return tuple(value)
    return value


@functools.cache
def _field_hints(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _read_tensors(path: Path, sha256: str) -> dict[str, Tensor]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SpikecompileError(f"cannot read {TENSORS_FILE} ({error.strerror})") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SpikecompileError(f"{TENSORS_FILE} does not belong to this {GRAPH_FILE} (sha256 differs); "
                                f"write the graph again")
    try:
        return safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:  # safetensors' errors besides its own
        raise SpikecompileError(f"{TENSORS_FILE}: not a readable safetensors file ({first_line(error)})") from None


def first_line(error: Exception) -> str:
    """A library error as a short clause for a one-line message: its type and the first line of its text."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def json_text(header: dict, listings: dict[str, list]) -> str:
    """The header keys one per line, then each listing with one item per line."""
    dump = functools.partial(json.dumps, ensure_ascii=False, allow_nan=False)
    lines = [f" {dump(key)}: {dump(value)}," for key, value in header.items()]
    for index, (key, items) in enumerate(listings.items()):
        rows = ",\n".join(f"  {dump(item)}" for item in items)
        lines.append(f" {dump(key)}: [\n{rows}\n ]{',' if index + 1 < len(listings) else ''}")
    return "{\n" + "\n".join(lines) + "\n}\n"
