"""Our reader: a NIR export folder (export.py) → the IR graph and the weights its nodes name.

Each lowered node is rebuilt from the record in the metadata of its NIR node (lower.py), its synapse weights taken
from that node's arrays; the node is then lowered again and must give exactly the NIR nodes and edges the segment
holds, so a segment changed after export is caught. Every other node comes from its manifest record. A file
listed in the manifest must still have the sha256 written there. Only spikecompile's own exports are read: a NIR
file from another tool, or one segment on its own, is refused with a message saying so.

The manifest is checked against its schema (schema.py) before anything else is read. Every failure, ours or a
library's (h5py, nir, safetensors, torch on data from a file), is one SpikecompileError line naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import nir
import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from ...errors import SpikecompileError
from ...files import file_sha256, read_document
from ...ir import Graph, IRNode, TensorType, validate
from ...ir.serialize import first_line
from .export import FORMAT, FORMAT_VERSION, MANIFEST_FILE, OPS_FILE
from .lower import VARIANTS, NotExpressible, Variant, lower
from .records import rebuild
from .schema import check_manifest

LIBRARY_ERRORS = (AttributeError, IndexError, KeyError, TypeError, ValueError, RuntimeError, ArithmeticError)
"""What numpy, torch and nir raise on data that is not what they expect: a damaged file, not a bug of ours."""


@dataclasses.dataclass
class Export:
    """An export folder opened and checked: its manifest and the weights of its ops (ops.safetensors)."""

    folder: Path
    manifest: dict
    weights: dict[str, Tensor]

    @property
    def variant(self) -> Variant:
        return VARIANTS[self.manifest["variant"]]

    def segment(self, path: str) -> nir.NIRGraph:
        """A segment's NIR graph, read with stock nir.read (types checked)."""
        try:
            return nir.read(self.folder / path)
        except Exception as error:  # h5py and nir raise anything from OSError to AssertionError on damaged bytes
            raise SpikecompileError(f"{self.folder / path}: not a readable NIR segment ({first_line(error)}); "
                                    f"export again") from None


def open_export(folder: str | Path) -> Export:
    """Open a NIR export folder; SpikecompileError if it is not one, or a file in it changed since export."""
    folder = Path(folder)
    if folder.is_file():
        raise SpikecompileError(_not_an_export(folder))
    if not (folder / MANIFEST_FILE).exists():
        raise SpikecompileError(f"{folder}: no {MANIFEST_FILE}, so not a spikecompile NIR export (spikecompile "
                                f"reads back only its own exports; a NIR file from another tool loads with nir.read)")
    manifest = read_document(folder / MANIFEST_FILE, "NIR manifest", FORMAT, FORMAT_VERSION, "export again")
    if not isinstance(manifest.get("variant"), str) or manifest["variant"] not in VARIANTS:  # a list is unhashable
        raise SpikecompileError(f"{folder / MANIFEST_FILE}: variant {manifest.get('variant')!r}; this spikecompile "
                                f"reads variants {', '.join(VARIANTS)}: export again")
    check_manifest((folder / MANIFEST_FILE).read_bytes(), folder / MANIFEST_FILE)
    for path, sha256 in manifest["files"].items():
        if not (folder / path).is_file() or file_sha256(folder / path) != sha256:
            raise SpikecompileError(f"{folder / path}: missing, or not the file this {MANIFEST_FILE} was written with "
                                    f"(sha256 differs); export again")
    try:
        weights = safetensors.torch.load((folder / OPS_FILE).read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as error:  # safetensors' errors besides its own
        raise SpikecompileError(f"{folder / OPS_FILE}: not a readable safetensors file ({first_line(error)})"
                                ) from None
    return Export(folder, manifest, weights)


def read(folder: str | Path) -> tuple[Graph, dict[str, Tensor]]:
    """The IR graph of an export and the tensors its TensorRefs name, every lowered node folded back and checked."""
    return graph_of(open_export(folder))


def graph_of(export: Export) -> tuple[Graph, dict[str, Tensor]]:
    """The graph and weights of an opened export (its manifest already checked against the schema)."""
    graph, store = Graph(), dict(export.weights)
    for step in export.manifest["steps"]:
        if "segment" in step:
            segment = export.segment(step["segment"])
            with _blame(export.folder / step["segment"]):
                for name, wiring in step["nodes"].items():
                    node, weights = _fold(segment, name, export.variant)
                    _add(graph, name, node, wiring)
                    store.update(weights)
        else:
            with _blame(export.folder / MANIFEST_FILE):
                _add(graph, step["name"], rebuild(step), step["inputs"])
    with _blame(export.folder):
        validate(graph)
    return graph, store


@contextlib.contextmanager
def _blame(path: Path):
    """An error inside, ours or a library's on data read from `path`, as one SpikecompileError line naming it."""
    try:
        yield
    except SpikecompileError as error:
        raise SpikecompileError(f"{path}: {error}") from None
    except LIBRARY_ERRORS as error:
        raise SpikecompileError(f"{path}: malformed ({first_line(error)}); export again") from None


def _add(graph: Graph, name: str, node: IRNode, wiring: list) -> None:
    graph.add_node(name, node)
    for source, port in wiring:
        graph.add_edge(source, name, port)


def _fold(segment: nir.NIRGraph, name: str, variant: Variant) -> tuple[IRNode, dict[str, Tensor]]:
    """IR node `name` from its NIR nodes, with the weights its TensorRefs name."""
    carrier = segment.nodes.get(name)
    if carrier is None or "spikecompile.ir" not in carrier.metadata:
        raise SpikecompileError(f"node {name}: not in its segment, or without its spikecompile.ir metadata")
    node = rebuild(json.loads(carrier.metadata["spikecompile.ir"]))
    weights = {ref.name: torch.from_numpy(np.asarray(getattr(carrier, field_name)))
               for field_name, ref in node.tensor_refs().items()}
    width = int(carrier.output_type["output"][-1])
    try:
        expected = lower(name, node, TensorType((width,), "float32"), variant, weights)
    except NotExpressible as error:
        raise SpikecompileError(f"node {name}: its spikecompile.ir metadata does not lower to NIR ({error})") from None
    found = {key: value for key, value in segment.nodes.items() if value.metadata.get("spikecompile.node") == name}
    edges = {tuple(edge) for edge in segment.edges}
    if (found.keys() != expected.nodes.keys() or not set(expected.edges) <= edges
            or not all(_same(found[key], expected.nodes[key]) for key in found)):
        raise SpikecompileError(f"node {name}: its NIR nodes are not what its spikecompile.ir metadata lowers to "
                                f"(was the segment changed after export?)")
    return node, weights


def _same(found: nir.NIRNode, expected: nir.NIRNode) -> bool:
    """Same NIR type and equal arrays (metadata aside)."""
    return type(found) is type(expected) and all(
        np.array_equal(getattr(found, field.name), getattr(expected, field.name))
        for field in dataclasses.fields(expected) if field.init and field.name != "metadata")


def _not_an_export(path: Path) -> str:
    try:
        graph = nir.read(path)
    except (OSError, KeyError, TypeError, ValueError, AssertionError):  # h5py, nir's asserts and type checks
        return f"{path}: not a NIR file; spikecompile reads back its NIR exports, folders holding {MANIFEST_FILE}"
    if isinstance(graph.metadata, dict) and graph.metadata.get("spikecompile.format") == FORMAT:
        return f"{path}: one segment of a spikecompile NIR export; read the export folder (the one holding " \
               f"{MANIFEST_FILE})"
    return f"{path}: a NIR file from another tool (no spikecompile metadata); spikecompile reads back only its own " \
           f"NIR exports (folders holding {MANIFEST_FILE}); load this one with nir.read"
