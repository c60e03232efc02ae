"""`spikecompile inspect`: what an IR graph holds, as numbers (summarize, format_summary) and as a picture of
one decoder layer (draw_layer).

Per-token figures bind the graph's symbolic sizes to one window of `seq_len` tokens: "batch" = 1,
"seq" = seq_len, and "seq+P" (a KV prefix of P tokens) = seq_len + P; a tensor's count per token is its
element count in that window divided by seq_len. Tensors with two sequence dims (attention scores and
probabilities, [.., S_q, S_k]) therefore grow with the context: per token they count all S_k = seq_len (+ P)
keys of the window, the last token's view (dense; causal masking leaves about half of them non-zero on average).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from pathlib import Path

import networkx as nx
import torch
from torch import Tensor

from .errors import SpikecompileError
from .files import atomic_write
from .ir import (
    ActivationMatmul, Graph, IRNode, Linear, PhaseNeuron, Rotation, TensorType, layer_indices, layer_of, tensor_refs,
    validate,
)
from .ir.neurons import SITE_KINDS
from .ir.shapes import bind, per_token, sequence_dims

DRAWING_SUFFIXES = (".svg", ".png")
MIB = 2 ** 20


# summarize

def summarize(graph: Graph, seq_len: int = 512) -> dict:
    """A JSON-serialisable summary of `graph` (validated first), with per-token figures for windows of
    `seq_len` tokens (conventions in the module docstring):

        layers           number of decoder layers (distinct N in node names "layers.N.…")
        nodes            number of nodes;  node_types: {type name: count}
        sites            one row per PhaseNeuron, in model order: site, layer (None for final_norm), kind, T,
                         genotype (steps per grain, e.g. [4, 4]), grains, tau, base2 (every base 2),
                         neurons_per_token (elements of the site's output per token; None when its shape has
                         no sequence dim or an unknown symbol), grows_with_context (two sequence dims)
        neurons_per_token  {total, grows_with_context: the part from such sites (attention probabilities)}
        synapses         linear_nodes, linear_weights = Σ over Linear nodes of fan-in × fan-out (also the
                         synaptic operations each token costs them, dense); activation_matmul_ops_per_token =
                         {qk, pv, total}: multiply-accumulates per token of the activation × activation
                         matmuls, output elements × inner size (dense over all keys), None if not computable
        memory           bytes, weight_bytes (distinct TensorRef names, so a weight referenced twice counts
                         once), node_tensor_bytes (tensors the nodes own: neuron bases, RoPE frequencies, rotation
                         signs — one copy per node, as the IR writes them), by_dtype {dtype: bytes}
        timesteps        the distinct T values set on nodes; nodes_without_timesteps: how many have none yet
        rotations        {online, offline}: counts of Rotation nodes
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise SpikecompileError(f"inspect: seq_len must be an int ≥ 1, got {seq_len!r}")
    types = validate(graph)
    bindings = {"batch": 1, "seq": seq_len}
    sites = [_site_row(name, graph[name], types[name], bindings) for name in _site_names(graph)]
    steps = [graph[name].timesteps for name in graph]
    return {
        "seq_len": seq_len,
        "layers": len(layer_indices(graph)),
        "nodes": len(graph),
        "node_types": dict(sorted(Counter(type(graph[name]).__name__ for name in graph).items())),
        "sites": sites,
        "neurons_per_token": _neuron_totals(sites),
        "synapses": _synapses(graph, types, bindings),
        "memory": _memory(graph),
        "timesteps": sorted({step for step in steps if step is not None}),
        "nodes_without_timesteps": sum(step is None for step in steps),
        "rotations": _rotation_counts(graph),
    }


def _site_names(graph: Graph) -> list[str]:
    """The PhaseNeuron nodes in model order: by layer (final_norm last), then by site kind."""
    def model_order(name: str) -> tuple:
        neuron = graph[name]
        layer = layer_of(neuron.site)
        kind_rank = SITE_KINDS.index(neuron.kind) if neuron.kind in SITE_KINDS else len(SITE_KINDS)
        return (0 if layer is not None else 1, layer or 0, kind_rank, name)

    return sorted((name for name in graph if isinstance(graph[name], PhaseNeuron)), key=model_order)


def _site_row(name: str, neuron: PhaseNeuron, output: TensorType, bindings: dict[str, int]) -> dict:
    grains = int(neuron.d.shape[-1])
    bases = torch.cat([neuron.d, neuron.h, neuron.theta])
    return {
        "site": neuron.site,
        "node": name,
        "layer": layer_of(neuron.site),
        "kind": neuron.kind,
        "T": neuron.timesteps,
        "genotype": torch.bincount(neuron.genotype, minlength=grains).tolist(),
        "grains": grains,
        "tau": float(neuron.tau),
        "base2": bool((bases == 2).all()),
        "K": int(neuron.max_spikes),
        "coding": _coding_of(neuron, bases),
        "neurons_per_token": per_token(output.shape, bindings),
        "grows_with_context": sequence_dims(output.shape) > 1,
    }


def _coding_of(neuron: PhaseNeuron, bases: torch.Tensor) -> str:
    """The coding a site's parameters say (conversion/codings.py): phase-sd, las/ttfs/spikedattn (base 2 with
    K = 0/1/2), rate or sdllm (bases 1), phase (fitted)."""
    if getattr(neuron, "signed_digits", False):
        return "phase-sd"
    if bool((bases == 2).all()):
        return {0: "las", 1: "ttfs", 2: "spikedattn"}.get(int(neuron.max_spikes), "base2")
    if bool((bases == 1).all()):
        return "sdllm" if neuron.max_spikes else "rate"
    return "phase"


def _neuron_totals(sites: list[dict]) -> dict:
    counts = [site["neurons_per_token"] for site in sites]
    if None in counts:
        return {"total": None, "grows_with_context": None}
    return {"total": sum(counts),
            "grows_with_context": sum(site["neurons_per_token"] for site in sites if site["grows_with_context"])}


def _synapses(graph: Graph, types: dict[str, TensorType], bindings: dict[str, int]) -> dict:
    linears = [graph[name] for name in graph if isinstance(graph[name], Linear)]
    return {
        "linear_nodes": len(linears),
        "linear_weights": sum(linear.in_features * linear.out_features for linear in linears),
        "activation_matmul_ops_per_token": _matmul_ops(graph, types, bindings),
    }


def _matmul_ops(graph: Graph, types: dict[str, TensorType], bindings: dict[str, int]) -> dict | None:
    """Multiply-accumulates per token of the ActivationMatmul nodes by `which`: each output element sums
    a's last dim (D for qk, S_k for pv) products."""
    ops = {"qk": 0, "pv": 0}
    for name in graph:
        node = graph[name]
        if not isinstance(node, ActivationMatmul):
            continue
        outputs = per_token(types[name].shape, bindings)
        inner = bind(types[graph.inputs(name)["a"]].shape[-1], bindings)
        if outputs is None or inner is None:
            return None
        ops[node.which] += outputs * inner
    return {**ops, "total": ops["qk"] + ops["pv"]}


def _memory(graph: Graph) -> dict:
    weights = tensor_refs(graph)
    node_tensors = [value for name in graph for value in _field_values(graph[name]) if isinstance(value, Tensor)]
    by_dtype: Counter[str] = Counter()
    for ref in weights.values():
        by_dtype[ref.dtype] += ref.nbytes
    weight_bytes = sum(by_dtype.values())
    for tensor in node_tensors:
        by_dtype[str(tensor.dtype).removeprefix("torch.")] += tensor.numel() * tensor.element_size()
    total = sum(by_dtype.values())
    return {"bytes": total, "weight_bytes": weight_bytes, "node_tensor_bytes": total - weight_bytes,
            "by_dtype": dict(sorted(by_dtype.items()))}


def _field_values(node: IRNode) -> list:
    return [getattr(node, field.name) for field in dataclasses.fields(node)]


def _rotation_counts(graph: Graph) -> dict:
    wheres = Counter(graph[name].where for name in graph if isinstance(graph[name], Rotation))
    return {"online": wheres["online"], "offline": wheres["offline"]}


# format_summary

def format_summary(summary: dict) -> str:
    """The summary as a text report: totals, then one line per spike site."""
    lines = [
        (f"IR graph: {summary['nodes']:,} nodes, {summary['layers']} decoder layers, "
         f"timesteps {_timesteps_text(summary)}"),
        "node types: " + ", ".join(f"{name} {count:,}" for name, count in summary["node_types"].items()),
        f"rotations: {summary['rotations']['online']} online, {summary['rotations']['offline']} offline",
        *_synapse_lines(summary),
        _neuron_line(summary),
        *_memory_lines(summary["memory"]),
        f"spike sites ({len(summary['sites'])}):",
        *_site_table(summary["sites"]),
    ]
    if "loihi2" in summary:
        from .passes.deployment import deployment_lines

        lines += deployment_lines(summary["loihi2"])
    return "\n".join(lines)


def deployment_summary(graph: Graph, store, samples=None) -> dict:
    """The Loihi 2 deployment report of `graph` (passes.deployment): formats and headroom, and the saturations on
    `samples` ({site: calibration samples}) when given; a one-line SpikecompileError for a site or matrix no format
    holds."""
    from .passes.deployment import formats_report, sample_saturation
    from .passes.loihi_mapping import deployed_formats

    formats = deployed_formats(graph, store)
    report = {"formats": formats_report(graph, formats)}
    if samples:
        report["sample_saturation"] = sample_saturation(graph, formats, samples)
    return report


def _timesteps_text(summary: dict) -> str:
    values = ", ".join(map(str, summary["timesteps"])) or "none set"
    unset = summary["nodes_without_timesteps"]
    return f"{{{values}}}" + (f" ({unset:,} nodes without T yet)" if unset else "")


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _synapse_lines(summary: dict) -> list[str]:
    synapses, seq_len = summary["synapses"], summary["seq_len"]
    lines = [(f"synapses: {synapses['linear_weights']:,} weights in {synapses['linear_nodes']:,} Linear nodes "
              f"(fan-in × fan-out; as many synaptic ops per token)")]
    ops = synapses["activation_matmul_ops_per_token"]
    if ops is None:
        lines.append("activation × activation matmuls: ops per token not computable (unknown size symbols)")
    elif ops["total"]:
        lines.append(f"activation × activation matmuls at seq_len {seq_len:,}: qk {ops['qk']:,} + pv {ops['pv']:,}"
                     f" = {ops['total']:,} multiply-accumulates per token (dense, grow with context)")
    return lines


def _neuron_line(summary: dict) -> str:
    neurons = summary["neurons_per_token"]
    line = f"neurons per token at seq_len {summary['seq_len']:,}: {_count(neurons['total'])}"
    if neurons["grows_with_context"]:
        line += f" (of which {neurons['grows_with_context']:,} grow with context: attention probabilities)"
    return line


def _mib(count: int) -> str:
    """A byte count in MiB; small counts (under 0.01 MiB) in bytes."""
    return f"{count / MIB:,.2f} MiB" if count >= MIB / 100 else f"{count:,} bytes"


def _memory_lines(memory: dict) -> list[str]:
    dtypes = ", ".join(f"{dtype} {_mib(count)}" for dtype, count in memory["by_dtype"].items())
    return [(f"parameter memory: {_mib(memory['bytes'])} ({memory['bytes']:,} bytes): weights "
             f"{_mib(memory['weight_bytes'])}, node tensors {_mib(memory['node_tensor_bytes'])}"),
            f"  by dtype: {dtypes or 'none'}"]


SITE_COLUMNS = ("site", "layer", "kind", "T", "K", "coding", "genotype", "n", "tau", "base2", "neurons/token")


def _site_cells(site: dict) -> tuple[str, ...]:
    neurons = _count(site["neurons_per_token"]) + (" (context)" if site["grows_with_context"] else "")
    return (site["site"], "-" if site["layer"] is None else str(site["layer"]), site["kind"], str(site["T"]),
            str(site["K"]), site["coding"], "+".join(map(str, site["genotype"])), str(site["grains"]), f"{site['tau']:.4g}",
            "yes" if site["base2"] else "no", neurons)


def _site_table(sites: list[dict]) -> list[str]:
    rows = [SITE_COLUMNS, *(_site_cells(site) for site in sites)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(SITE_COLUMNS))]
    numeric = {"layer", "T", "K", "n", "tau", "neurons/token"}
    return ["  " + "  ".join(cell.rjust(width) if SITE_COLUMNS[column] in numeric else cell.ljust(width)
                             for column, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]


# draw_layer

NODE_COLOURS = {
    "PhaseNeuron": "#e4572e", "Linear": "#6fa8dc", "ActivationMatmul": "#8e7cc3", "ElementwiseProduct": "#b4a7d6",
    "Nonlinear": "#93c47d", "RoPE": "#ffd966", "Rotation": "#f6b26b", "SplitHeads": "#d9d9d9",
    "MergeHeads": "#d9d9d9", "KVPrefix": "#c9daf8", "ResidualAdd": "#a2c4c9", "Embedding": "#ffffff",
    "Input": "#ffffff", "Output": "#ffffff",
}
OTHER_COLOUR = "#cccccc"
OUTSIDE_COLOUR = "#f3f3f3"


def draw_layer(graph: Graph, layer: int, path: str | Path) -> None:
    """Draw decoder layer `layer` (the nodes named "layers.{layer}.…" and the nodes outside it that feed
    them: the residual stream) top to bottom by topological generation, coloured by node type, to an SVG or
    PNG file chosen by the suffix of `path`; the file is written atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DRAWING_SUFFIXES:
        raise SpikecompileError(f"{path}: cannot draw to a {suffix or 'suffix-less'} file; "
                                f"use one of {', '.join(DRAWING_SUFFIXES)}")
    validate(graph)
    drawn, outside = layer_drawing_graph(graph, layer)
    figure = _figure(graph, drawn, outside, layer)
    atomic_write(path, lambda temp: _save(figure, temp, suffix[1:]))


def layer_drawing_graph(graph: Graph, layer: int) -> tuple[nx.DiGraph, set[str]]:
    """The nodes of decoder layer `layer` plus their producers outside it, the edges among them, and the
    set of those outside producers; SpikecompileError if the graph has no such layer."""
    layers = layer_indices(graph)
    if isinstance(layer, bool) or not isinstance(layer, int) or layer not in layers:
        raise SpikecompileError(f"--layer {layer!r}: no decoder layer {layer!r}; valid layers: {_layer_range(layers)}")
    inside = {name for name in graph if layer_of(name) == layer}
    outside = {source for name in inside for source in graph.producers(name) if source not in inside}
    drawn = nx.DiGraph()
    drawn.add_nodes_from(name for name in graph if name in inside or name in outside)  # graph order: reproducible
    drawn.add_edges_from((source, target) for source, target, _ in graph.edges() if source in drawn and target in drawn)
    return drawn, outside


def _layer_range(layers: list[int]) -> str:
    if not layers:
        return "none (the graph has no nodes named layers.N.…)"
    if layers == list(range(len(layers))):
        return f"0..{layers[-1]}"
    return ", ".join(map(str, layers))


def _positions(drawn: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """A layered top-to-bottom layout: row = topological generation, each row ordered by the mean column of
    its nodes' producers (ties by name) and centred."""
    positions: dict[str, tuple[float, float]] = {}
    for row, generation in enumerate(nx.topological_generations(drawn)):
        def parent_column(name: str) -> float:
            columns = [positions[source][0] for source in drawn.predecessors(name)]
            return sum(columns) / len(columns) if columns else 0.0

        ordered = sorted(generation, key=lambda name: (parent_column(name), name))
        for column, name in enumerate(ordered):
            positions[name] = (column - (len(ordered) - 1) / 2, -float(row))
    return positions


BOX_HALF_WIDTH = 0.42  # data units (one column = 1): about the widest label's half-width at the drawing's scale
LANE_GAP = 0.3


def _edge_routes(drawn: nx.DiGraph, positions: dict[str, tuple[float, float]]) -> dict[tuple, list]:
    """Waypoints of each edge: none when the straight line passes clear of the boxes in the rows it crosses;
    otherwise a detour down a vertical lane right of those rows (the residual stream's skip edges), each
    detour in a lane of its own where their spans overlap."""
    rows: dict[float, list[float]] = {}
    for x, y in positions.values():
        rows.setdefault(y, []).append(x)
    lanes: list[tuple[float, float, float]] = []  # (x, top y, bottom y) of each detour so far
    routes = {}
    for source, target in sorted(drawn.edges, key=lambda edge: (positions[edge[0]][1], edge)):
        (x0, y0), (x1, y1) = positions[source], positions[target]
        crossed = [y for y in rows if y1 < y < y0]
        if all(abs(x0 + (x1 - x0) * (y0 - y) / (y0 - y1) - x) > BOX_HALF_WIDTH for y in crossed for x in rows[y]):
            routes[(source, target)] = []
            continue
        lane = max(x for y in crossed for x in rows[y]) + 2 * BOX_HALF_WIDTH
        while any(abs(lane - x) < LANE_GAP / 2 and top > y1 and bottom < y0 for x, top, bottom in lanes):
            lane += LANE_GAP
        lanes.append((lane, y0, y1))
        routes[(source, target)] = [(lane, y0 - 0.5), (lane, y1 + 0.5)]
    return routes


def _draw_edge(axes, points: list[tuple[float, float]], source_box, target_box) -> None:
    """The polyline through `points`, clipped at the two boxes, with an arrowhead at the target."""
    style = {"color": "#555555", "lw": 0.8, "shrinkA": 0, "shrinkB": 0}
    for index, (start, end) in enumerate(itertools.pairwise(points)):
        is_last = index == len(points) - 2
        axes.annotate("", xy=end, xytext=start,
                      arrowprops={**style, "arrowstyle": "-|>" if is_last else "-",
                                  "patchA": source_box if index == 0 else None,
                                  "patchB": target_box if is_last else None})


def _labels(graph: Graph, drawn: nx.DiGraph, outside: set[str]) -> dict[str, str]:
    """Each node's label: its last name part (two parts where the last is ambiguous; the full name for nodes
    outside the layer), then its T."""
    last = Counter(name.rsplit(".", 1)[-1] for name in drawn if name not in outside)
    labels = {}
    for name in drawn:
        short = name.rsplit(".", 1)[-1]
        if name in outside:
            short = name
        elif last[short] > 1:
            short = ".".join(name.split(".")[-2:])
        steps = graph[name].timesteps
        labels[name] = f"{short}\nT={'?' if steps is None else steps}"
    return labels


def _figure(graph: Graph, drawn: nx.DiGraph, outside: set[str], layer: int):
    """The drawing as a matplotlib Figure (no pyplot: no global state, no GUI; PNGs render with Agg)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    positions = _positions(drawn)
    labels = _labels(graph, drawn, outside)
    columns = max(x for x, _ in positions.values()) - min(x for x, _ in positions.values()) + 2
    rows = 1 - min(y for _, y in positions.values())
    figure = Figure(figsize=(max(7.0, 2.0 * columns + 2.5), max(4.0, 0.75 * rows + 1.5)))
    axes = figure.subplots()
    boxes = {name: _draw_node(axes, graph, name, positions[name], labels[name], name in outside) for name in drawn}
    routes = _edge_routes(drawn, positions)
    for (source, target), waypoints in routes.items():
        _draw_edge(axes, [positions[source], *waypoints, positions[target]], boxes[source], boxes[target])
    present = sorted({type(graph[name]).__name__ for name in drawn if name not in outside})
    handles = [Patch(facecolor=NODE_COLOURS.get(kind, OTHER_COLOUR), edgecolor="#333333", label=kind)
               for kind in present]
    handles.append(Patch(facecolor=OUTSIDE_COLOUR, edgecolor="#888888", linestyle="--", label="outside the layer"))
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    sites = sum(isinstance(graph[name], PhaseNeuron) for name in drawn if name not in outside)
    axes.set_title(f"decoder layer {layer}: {len(drawn) - len(outside)} nodes, {sites} spike sites", fontsize=10)
    lanes = [x for waypoints in routes.values() for x, _ in waypoints]
    axes.set_xlim(min(x for x, _ in positions.values()) - 0.8, max([x for x, _ in positions.values()] + lanes) + 0.8)
    axes.set_ylim(min(y for _, y in positions.values()) - 0.6, 0.6)
    axes.axis("off")
    figure.tight_layout()
    return figure


def _draw_node(axes, graph: Graph, name: str, position: tuple[float, float], label: str, is_outside: bool):
    """A rounded box holding the label; spike sites in a strong colour with a heavy border. Returns the box."""
    kind = type(graph[name]).__name__
    is_site = kind == "PhaseNeuron"
    colour = OUTSIDE_COLOUR if is_outside else NODE_COLOURS.get(kind, OTHER_COLOUR)
    box = {"boxstyle": "round,pad=0.35", "facecolor": colour,
           "edgecolor": "#7f0000" if is_site else "#888888" if is_outside else "#333333",
           "linewidth": 2.0 if is_site else 0.8, "linestyle": "--" if is_outside else "-"}
    text = axes.text(*position, label, ha="center", va="center", fontsize=7, zorder=3, bbox=box,
                     fontweight="bold" if is_site else "normal")
    return text.get_bbox_patch()


def _save(figure, temp: str, file_format: str) -> None:
    """Save with text as text in SVGs (searchable labels) and no timestamps, so the bytes are reproducible."""
    import matplotlib

    metadata = {"Date": None} if file_format == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "spikecompile"}):
        figure.savefig(temp, format=file_format, metadata=metadata, dpi=110, bbox_inches="tight")
