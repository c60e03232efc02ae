"""IR graph → a NIR export folder:

    segments/<first node>.nir   standard NIR graphs (nir.write, HDF5 uncompressed: gzip saves ~6 % on SmolLM2 at
                                2.6× the time) of the nodes NIR expresses (lower.py)
    ops.safetensors             the weights the manifest's ops name (norm γ, embedding, KV-prefix cache)
    manifest.json               the steps in run order, stitching segments and ops; written last
    fidelity.json               per IR node: exact / approximated / not expressible in NIR, where, and why

A segment is a connected run of lowered nodes that no path leaves and re-enters: each node gets a level, the
number of not-lowered nodes on the longest path to it, and a segment is a connected set of lowered nodes of one
level, so the steps form a DAG. A segment's NIR graph has an Input node "input.<V>" for each IR value V it reads
from outside and an Output node "output.<V>" for each value used outside; all other NIR names start with the IR
node's name (lower.py). manifest.json:

    {"format": "spikecompile.nir", "format_version": 3, "variant": "exact"|"approximate", "nir": <version>,
     "files": {<path>: <sha256>},
     "steps": [{"segment": "segments/layers.0.mlp_norm.nir", "nodes": {<IR name>: [[<producer>, <port>], ...]},
                "inputs": [<IR value>, ...], "outputs": [<IR value>, ...]},
               {"name": <IR name>, "type": ..., "fields": ..., "tensors": ..., "inputs": [[<producer>, <port>]]},
               ...],
     "specs": {<IR type>: <its docstring: the equation>}}

A step of the second kind is an IR node record (records.py): a graph input or output, or an op NIR cannot express,
run by our interpreter (run.py); its TensorRefs name tensors in ops.safetensors. Ports are as in graph.json
(null: the node's only input). Writing is deterministic and atomic per file; each HDF5 file is built in memory
first (write_hdf5), so a full disk fails as a plain OSError, not inside HDF5.
"""

from __future__ import annotations

import collections
import inspect
import io
from pathlib import Path

import networkx as nx
import nir
import numpy as np
import safetensors.torch
import torch

from ...errors import SpikecompileError
from ...files import atomic_write, check_writable, file_sha256
from ...ir import Graph, Input, Output, TensorStore, TensorType, tensor_refs, validate
from ...ir.base import torch_dtype
from ...ir.serialize import json_text
from ...progress import bar
from .. import BuildResult, widened_result
from .lower import LOWERINGS, NOT_EXPRESSIBLE, VARIANTS, Lowered, NotExpressible, Variant, lower, vector_width
from .records import describe

FORMAT = "spikecompile.nir"
FORMAT_VERSION = 3
"""3: phase-neuron records carry signed_digits (the signed-digit neuron lowers on one signed potential);
2: phase-neuron records carry v0 and max_spikes, and a spike budget unrolls into more stock nodes (lower.py);
1: every neuron 10T + 2 nodes with v0 = ½·τ·2^-T."""
MANIFEST_FILE = "manifest.json"
FIDELITY_FILE = "fidelity.json"
OPS_FILE = "ops.safetensors"
SEGMENTS_FOLDER = "segments"
EXACT, APPROXIMATED, NOT_IN_NIR = "exact", "approximated", "not expressible in NIR"


def build_nir(result: BuildResult, folder: str | Path, strict: bool = False, approximate: bool = False,
              progress: bool = True) -> dict:
    """`spikecompile build --target nir`: export the built graph to `folder` (see export); the fidelity report."""
    result = widened_result(result)
    return export(result.graph, result.store, folder, strict=strict, variant="approximate" if approximate else "exact",
                  progress=progress)


def export(graph: Graph, store: TensorStore, folder: str | Path, *, strict: bool = False,
           variant: str = "exact", progress: bool = False) -> dict:
    """Write `graph` (weights from `store`) as a NIR export into `folder` and return its fidelity report.

    variant "exact" (stock Threshold/Scale) or "approximate" (IF/Linear, lower.py). strict: a node that NIR
    cannot express and no manifest rule describes is an error (raised before anything is written); otherwise it
    is listed under "unsupported" in the report and recorded in the manifest all the same. progress: bars on a
    terminal's stderr (progress.bar), one step per IR node lowered, then one per step written (a segment file or
    a manifest op).
    """
    if variant not in VARIANTS:
        raise SpikecompileError(f"NIR variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    chosen = VARIANTS[variant]
    types = validate(graph)
    lowered, reasons = _classify(graph, types, chosen, progress)
    unsupported = [name for name, reason in reasons.items() if reason is None]
    if strict and unsupported:
        raise SpikecompileError(f"--strict: NIR cannot express, and no manifest rule describes, "
                                f"{', '.join(f'{name} ({type(graph[name]).__name__})' for name in unsupported)}")
    folder = _prepare(folder)
    files, steps, located = {}, [], {}
    for members in bar(_steps(graph, set(lowered)), desc="nir: write", unit="step", progress=progress):
        if members[0] not in lowered:
            steps.append({**describe(members[0], graph[members[0]]), "inputs": _wiring(graph, members[0])})
            continue
        path = f"{SEGMENTS_FOLDER}/{members[0]}.nir"
        parts = {name: lower(name, graph[name], types[name], chosen, store) for name in members}
        segment, inputs, outputs = _segment(graph, members, parts, types, chosen)
        del parts  # one segment's weights at a time
        files[path] = _write(folder / path, lambda temp, segment=segment: write_hdf5(
            temp, lambda stream: nir.write(stream, segment, compression=None)))
        steps.append({"segment": path, "nodes": {name: _wiring(graph, name) for name in members},
                      "inputs": inputs, "outputs": outputs})
        located.update(dict.fromkeys(members, path))
    ops = [name for name in graph if name not in lowered]
    weights = {key: ref.resolve(store).detach().cpu().clone()
               for key, ref in sorted(tensor_refs(graph.induced(ops)).items())}
    files[OPS_FILE] = _write(folder / OPS_FILE, lambda temp: Path(temp).write_bytes(safetensors.torch.save(weights)))
    report = _fidelity(graph, lowered, reasons, located, chosen)
    _write(folder / FIDELITY_FILE, lambda temp: _dump(report, ("nodes",), temp))
    specs = {type(graph[name]).__name__: inspect.cleandoc(type(graph[name]).__doc__ or "") for name in ops}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "variant": variant, "nir": nir.version,
                "files": files, "steps": steps,
                "specs": [{"type": kind, "spec": spec} for kind, spec in sorted(specs.items())]}
    _write(folder / MANIFEST_FILE, lambda temp: _dump(manifest, ("steps", "specs"), temp))
    return report


def _classify(graph: Graph, types: dict[str, TensorType], variant: Variant, progress: bool = False
              ) -> tuple[dict[str, bool], dict[str, str | None]]:
    """Which nodes NIR expresses ({name: whether approximated}), and for every other node but the graph's inputs and
    outputs, why not (None: no lowering and no manifest rule). Each node is lowered against placeholder weights
    (_Placeholders: no memory) and the result dropped: the export lowers each segment again, with its weights, only
    when it writes it, so the whole model's NIR arrays are never held at once."""
    lowered, reasons = {}, {}
    placeholders = _Placeholders(graph)
    for name in bar(graph.topological_order(), desc="nir: lower", unit="node", progress=progress):
        node = graph[name]
        if type(node) in LOWERINGS:
            try:
                nodes = lower(name, node, types[name], variant, placeholders).nodes.values()
            except NotExpressible as error:
                reasons[name] = f"{type(node).__name__}: {error}"
            else:
                lowered[name] = any(isinstance(part, nir.IF) for part in nodes)
        elif not isinstance(node, Input | Output):
            reasons[name] = NOT_EXPRESSIBLE.get(type(node))
    return lowered, reasons


class _Placeholders:
    """A TensorStore that answers each of the graph's TensorRefs with zeros of its shape and dtype, broadcast from
    one element (no memory)."""

    def __init__(self, graph: Graph):
        self._refs = tensor_refs(graph)

    def __getitem__(self, name: str) -> torch.Tensor:
        ref = self._refs[name]
        return torch.zeros((), dtype=torch_dtype(ref.dtype)).expand(ref.shape)


def _steps(graph: Graph, lowered: set[str]) -> list[list[str]]:
    """The export's steps in run order, each a list of IR names: a segment, or one node that is not lowered."""
    order = graph.topological_order()
    level: dict[str, int] = {}
    for name in order:
        level[name] = max((level[source] + (source not in lowered) for source in graph.producers(name)),
                          default=0)
    joined = nx.Graph()
    joined.add_nodes_from(lowered)
    joined.add_edges_from((source, target) for source, target, _ in graph.edges()
                          if source in lowered and target in lowered and level[source] == level[target])
    position = {name: index for index, name in enumerate(order)}
    step_of = {name: name for name in graph}
    for members in nx.connected_components(joined):
        first = min(members, key=position.get)
        step_of.update(dict.fromkeys(members, first))
    quotient = nx.DiGraph()
    quotient.add_nodes_from(set(step_of.values()))
    quotient.add_edges_from((step_of[source], step_of[target]) for source, target, _ in graph.edges()
                            if step_of[source] != step_of[target])
    members_of = collections.defaultdict(list)
    for name in order:
        members_of[step_of[name]].append(name)
    return [members_of[first] for first in nx.lexicographical_topological_sort(quotient, key=position.get)]


def _segment(graph: Graph, members: list[str], parts: dict[str, Lowered], types: dict[str, TensorType],
             variant: Variant) -> tuple[nir.NIRGraph, list[str], list[str]]:
    """The NIR graph of one segment, the IR values it reads from outside and those it gives out."""
    inside = set(members)
    inputs, nodes, edges = [], {}, []
    for name in members:
        part = parts[name]
        nodes.update(part.nodes)
        edges.extend(part.edges)
        for port, source in graph.inputs(name).items():
            if source not in inside and source not in inputs:
                inputs.append(source)
            producer = source if source in inside else f"input.{source}"
            edges.extend((producer, entry) for entry in part.entries[port])
    outputs = [name for name in members
               if not graph.consumers(name) or any(target not in inside for target in graph.consumers(name))]
    edges.extend((name, f"output.{name}") for name in outputs)
    nodes = ({f"input.{value}": nir.Input(input_type=np.array([vector_width(types[value])])) for value in inputs}
             | nodes | {f"output.{value}": nir.Output(output_type=np.array([vector_width(types[value])]))
                        for value in outputs})
    fidelity = "exact" if variant.approximates is None else f"approximate: {variant.approximates}"
    metadata = {"spikecompile.format": FORMAT, "spikecompile.format_version": FORMAT_VERSION,
                "spikecompile.variant": variant.name, "spikecompile.fidelity": fidelity,
                "spikecompile.manifest": f"../{MANIFEST_FILE}"}
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata), inputs, outputs


def _fidelity(graph: Graph, lowered: dict[str, bool], reasons: dict[str, str | None], located: dict[str, str],
              variant: Variant) -> dict:
    """The fidelity report: counts by level, the nodes without a rule, and one entry per IR node in graph order
    (lowered: {name: whether approximated})."""
    nodes = []
    for name in graph.topological_order():
        kind = type(graph[name]).__name__
        if name in lowered:
            approximated = lowered[name]
            entry = {"fidelity": APPROXIMATED if approximated else EXACT, "file": located[name]}
            if approximated:
                entry["reason"] = variant.approximates
        elif name in reasons:
            reason = reasons[name] or f"no NIR lowering and no manifest rule for node type {kind}"
            entry = {"fidelity": NOT_IN_NIR, "file": MANIFEST_FILE, "reason": reason}
        else:
            entry = {"fidelity": EXACT, "file": MANIFEST_FILE, "reason": "a graph input or output"}
        nodes.append({"node": name, "type": kind, **entry})
    counts = collections.Counter(entry["fidelity"] for entry in nodes)
    return {"format": "spikecompile.nir.fidelity", "variant": variant.name,
            "counts": {level: counts[level] for level in (EXACT, APPROXIMATED, NOT_IN_NIR)},
            "unsupported": [name for name, reason in reasons.items() if reason is None], "nodes": nodes}


def _wiring(graph: Graph, name: str) -> list[list[str | None]]:
    """The node's input edges as [producer, port] (port None: its only input), as graph.json writes them."""
    return [[source, port] for source, _, port in graph.in_edges(name)]


def _prepare(folder: str | Path) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(exist_ok=True)
        check_writable(folder / MANIFEST_FILE)
        (folder / SEGMENTS_FOLDER).mkdir(exist_ok=True)
    except OSError as error:
        raise SpikecompileError(f"{folder}: cannot create the NIR export folder ({error.strerror})") from None
    return folder


def _write(path: Path, write) -> str:
    """Write atomically with write(temp_path); the file's sha256."""
    atomic_write(path, write)
    return file_sha256(path)


def write_hdf5(path, write) -> None:
    """write(stream) an HDF5 file (nir.write, nir.write_data) into memory, then its bytes to `path` in Python: HDF5
    itself never meets a failing disk, where its handles fail to close, print to stderr and crash the process at
    exit (ENOSPC: segfault); a full disk is then a plain OSError. Same bytes every time, as from a file."""
    image = io.BytesIO()
    write(image)
    Path(path).write_bytes(image.getbuffer())


def _dump(document: dict, listings: tuple[str, ...], path) -> None:
    """JSON with one header key, and one item of each listing, per line (as graph.json)."""
    header = {key: value for key, value in document.items() if key not in listings}
    text = json_text(header, {key: document[key] for key in listings})
    Path(path).write_text(text, encoding="utf-8")

