"""The IR graph (a networkx DiGraph of named IR nodes) and its validator.

Node attribute "node": the IRNode; edge attribute "port": the input of the consumer that the edge feeds
(None: the consumer's only input). Names follow the model's module paths ("layers.3.mlp.down_proj"), so
decoder layer 3 is the subgraph of names starting with "layers.3.". A DiGraph holds one edge per
(producer, consumer) pair: one node cannot feed two ports of the same consumer.
"""

from __future__ import annotations

import networkx as nx

from ..errors import SpikecompileError
from .base import NODE_TYPES, IRNode, TensorType


class Graph:
    def __init__(self, digraph: nx.DiGraph | None = None):
        self.nx = nx.DiGraph() if digraph is None else digraph

    def add_node(self, name: str, node: IRNode) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a node name must be a non-empty str, got {name!r}")
        if self.nx.nodes.get(name, {}).get("node") is not None:
            raise ValueError(f"node {name} is defined twice")
        self.nx.add_node(name, node=node)

    def add_edge(self, source: str, target: str, port: str | None = None) -> None:
        """`source` feeds input `port` of `target`; either may be added later (validate checks both exist)."""
        self.nx.add_edge(source, target, port=port)

    def __getitem__(self, name: str) -> IRNode:
        return self.nx.nodes[name]["node"]

    def __iter__(self):
        return iter(self.nx)

    def __len__(self) -> int:
        return len(self.nx)

    def edges(self) -> list[tuple[str, str, str | None]]:
        return list(self.nx.edges(data="port"))

    def inputs(self, name: str) -> dict[str, str]:
        """The producer of each input port of `name`, in the node type's port order; SpikecompileError if an
        input is missing, unknown or fed twice."""
        node = self[name]
        producers = {}
        for source, _, port in self.nx.in_edges(name, data="port"):
            port = node.inputs[0] if port is None and len(node.inputs) == 1 else port
            if port not in node.inputs:
                raise SpikecompileError(f"node {name}: {type(node).__name__} has no input {port!r} (fed by {source}); "
                                        f"its inputs are {list(node.inputs)}")
            if port in producers:
                raise SpikecompileError(f"node {name}: input {port} is fed by both {producers[port]} and {source}")
            producers[port] = source
        missing = [port for port in node.inputs if port not in producers]
        if missing:
            raise SpikecompileError(f"node {name}: {type(node).__name__} lacks input {', '.join(missing)}")
        return {port: producers[port] for port in node.inputs}

    def topological_order(self) -> list[str]:
        return list(nx.topological_sort(self.nx))

    def subgraph(self, prefix: str) -> Graph:
        """The nodes whose names start with `prefix` (e.g. "layers.3.") and the edges between them, copied."""
        return Graph(self.nx.subgraph([name for name in self.nx if name.startswith(prefix)]).copy())


BLOCKS = {"attn": ("input_layernorm", "attn_residual"), "mlp": ("post_attention_layernorm", "mlp_residual")}


def decoder_block(graph: Graph, layer: int, which: str) -> Graph:
    """The attention or MLP block of decoder layer `layer` as a graph of its own (nodes copied, not cloned):
    an Input "block_input" (the residual stream entering the block's norm, arriving whole at t = 0) feeds the
    norm; every node on a path from the norm to the block's branch into the residual add is kept; an Output
    "block_output" takes that branch. SpikecompileError naming what is missing."""
    if which not in BLOCKS:
        raise SpikecompileError(f"block {which!r}: choose one of {', '.join(BLOCKS)}")
    norm_name, residual_name = (f"layers.{layer}.{part}" for part in BLOCKS[which])
    if norm_name not in graph.nx or residual_name not in graph.nx:
        layers = sorted({int(name.split(".")[1]) for name in graph if name.startswith("layers.")})
        raise SpikecompileError(f"block {which} of layer {layer}: not in the graph (layers: "
                                f"{f'{layers[0]}..{layers[-1]}' if layers else 'none'})")
    branch_end = graph.inputs(residual_name)["branch"]
    keep = (nx.descendants(graph.nx, norm_name) & nx.ancestors(graph.nx, branch_end)) | {norm_name, branch_end}
    outside = {source for name in keep for source in graph.nx.predecessors(name) if source not in keep}
    unexpected = outside - {graph.inputs(norm_name)["x"]}
    if unexpected:
        raise SpikecompileError(f"block {which} of layer {layer}: fed from outside by {', '.join(sorted(unexpected))}")
    types = validate(graph)
    block = Graph(graph.nx.subgraph(keep).copy())
    block.add_node("block_input", _input_node(types[graph.inputs(norm_name)["x"]], graph[norm_name].timesteps))
    block.add_edge("block_input", norm_name)
    block.add_node("block_output", _output_node(graph[residual_name].timesteps))
    block.add_edge(branch_end, "block_output")
    validate(block)
    return block


def _input_node(of: TensorType, timesteps: int | None) -> IRNode:
    from .linear import Input

    return Input(shape=of.shape, dtype=of.dtype, timesteps=timesteps)


def _output_node(timesteps: int | None) -> IRNode:
    from .linear import Output

    return Output(timesteps=timesteps)


def validate(graph: Graph) -> dict[str, TensorType]:
    """Check every node, edge, port, timestep count and shape; return each node's output type.

    Failures are one-line SpikecompileErrors naming the node: a dangling edge, an unknown node type, a missing
    or unknown input port, a cycle, a timestep mismatch along an edge, a type mismatch at a node's inputs.
    """
    for name, node in graph.nx.nodes(data="node"):
        if node is None:
            edges = [*graph.nx.in_edges(name), *graph.nx.out_edges(name)]
            where = f"edge {' → '.join(edges[0])}" if edges else f"node {name}"
            raise SpikecompileError(f"{where}: no node named {name}")
        if NODE_TYPES.get(type(node).__name__) is not type(node):
            raise SpikecompileError(f"node {name}: unknown node type {type(node).__name__}")
    producers = {name: graph.inputs(name) for name in graph}
    try:
        order = graph.topological_order()
    except nx.NetworkXUnfeasible:
        cycle = [source for source, _ in nx.find_cycle(graph.nx)]
        raise SpikecompileError(f"node {cycle[0]}: on a cycle {' → '.join([*cycle, cycle[0]])}") from None
    for source, target in graph.nx.edges:
        produced, consumer = graph[source].timesteps, graph[target]
        if None not in (produced, consumer.timesteps) and produced != consumer.timesteps \
                and not consumer.integrates_input:
            raise SpikecompileError(f"node {target}: runs {consumer.timesteps} timesteps, but its input {source} "
                                    f"delivers {produced}")
    types = {}
    for name in order:
        node = graph[name]
        try:
            types[name] = node.infer({port: types[source] for port, source in producers[name].items()})
        except ValueError as error:
            raise SpikecompileError(f"node {name}: {type(node).__name__}: {error}") from None
    return types
