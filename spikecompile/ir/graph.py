"""The IR graph (a networkx DiGraph of named IR nodes) and its validator.

Node attribute "node": the IRNode; edge attribute "port": the input of the consumer that the edge feeds
(None: the consumer's only input). Names follow the model's module paths ("layers.3.mlp.down_proj"), so
decoder layer 3 is the subgraph of names starting with "layers.3." (ir.layers). Code outside ir/ reads and
rewrites a graph through Graph's methods, never through its networkx DiGraph `nx`. A DiGraph holds one edge per
(producer, consumer) pair: one node cannot feed two ports of the same consumer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping

import networkx as nx
import torch

from ..errors import SpikecompileError
from .base import NODE_TYPES, IRNode, TensorRef, TensorType, torch_dtype


class Graph:
    """Named IR nodes and the ported edges between them. Reads (consumers, in_edges, ancestors, ...) return
    copies, so a caller may rewrite the graph (replace, remove_node, add_edge) while it walks what it read."""

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

    def __contains__(self, name: str) -> bool:
        return name in self.nx

    def copy(self) -> Graph:
        """A new graph with the same names, nodes and edges: rewriting it (replace, remove_node, add_edge) leaves
        this one as it is. The IRNodes are shared, not cloned (they are frozen)."""
        return Graph(self.nx.copy())

    def replace(self, name: str, node: IRNode) -> None:
        """Put `node` in the place of node `name`, keeping its edges and ports (KeyError: no such node)."""
        self.nx.nodes[name]["node"] = node

    def remove_node(self, name: str) -> None:
        """Remove node `name` and every edge into or out of it."""
        self.nx.remove_node(name)

    def remove_edge(self, source: str, target: str) -> None:
        """Drop the edge source → target (the nodes stay)."""
        self.nx.remove_edge(source, target)

    def remove_nodes(self, names) -> None:
        """Remove the named nodes and their edges; names not in the graph are ignored."""
        self.nx.remove_nodes_from(names)

    def edges(self) -> list[tuple[str, str, str | None]]:
        """Every edge as (producer, consumer, port)."""
        return list(self.nx.edges(data="port"))

    def in_edges(self, name: str) -> list[tuple[str, str, str | None]]:
        """The edges into `name` as (producer, name, port), in the order they were added."""
        return list(self.nx.in_edges(name, data="port"))

    def out_edges(self, name: str) -> list[tuple[str, str, str | None]]:
        """The edges out of `name` as (name, consumer, port), in the order they were added."""
        return list(self.nx.out_edges(name, data="port"))

    def has_edge(self, source: str, target: str) -> bool:
        """Whether `source` feeds `target` (on any port)."""
        return self.nx.has_edge(source, target)

    def producers(self, name: str) -> list[str]:
        """The nodes that feed `name`, once each."""
        return list(self.nx.predecessors(name))

    def consumers(self, name: str) -> list[str]:
        """The nodes that `name` feeds, once each, in the order the edges were added."""
        return list(self.nx.successors(name))

    def ancestors(self, name: str) -> set[str]:
        """Every node with a path to `name` (`name` itself not included)."""
        return nx.ancestors(self.nx, name)

    def descendants(self, name: str) -> set[str]:
        """Every node on a path from `name` (`name` itself not included)."""
        return nx.descendants(self.nx, name)

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

    def induced(self, names) -> Graph:
        """The named nodes and the edges between them, as a new graph in this graph's node and edge order."""
        keep = set(names)
        part = nx.DiGraph()
        part.add_nodes_from((name, data) for name, data in self.nx.nodes(data=True) if name in keep)
        part.add_edges_from((source, target, data) for source, target, data in self.nx.edges(data=True)
                            if source in keep and target in keep)
        return Graph(part)

    def subgraph(self, prefix: str) -> Graph:
        """The nodes whose names start with `prefix` (e.g. "layers.3.") and the edges between them, copied."""
        return self.induced(name for name in self.nx if name.startswith(prefix))


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


def tensor_refs(graph: Graph) -> dict[str, TensorRef]:
    """Every TensorRef the graph's nodes hold, by tensor name."""
    return {ref.name: ref for name in graph for ref in graph[name].tensor_refs().values()}


HALF_DTYPES = ("bfloat16", "float16")


class StoreView(MutableMapping):
    """A view of a TensorStore whose writes and deletions stay in the view: the store under it is never changed.
    A subclass may change how the store's tensors read (_read) and where a written tensor is kept (_stash; given
    back by _unstash, let go by _release)."""

    def __init__(self, store):
        self._store = store
        self._written: dict = {}
        self._deleted: set[str] = set()

    def _read(self, name: str):
        return self._store[name]

    def _stash(self, name: str, tensor):
        return tensor

    def _unstash(self, kept):
        return kept

    def _release(self, kept) -> None:
        pass

    def __getitem__(self, name: str):
        if name in self._written:
            return self._unstash(self._written[name])
        if name in self._deleted or name not in self._store:
            raise KeyError(name)
        return self._read(name)

    def __setitem__(self, name: str, tensor) -> None:
        self._discard(name)
        self._written[name] = self._stash(name, tensor)
        self._deleted.discard(name)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._discard(name)
        self._deleted.add(name)

    def _discard(self, name: str) -> None:
        if name in self._written:
            self._release(self._written.pop(name))

    def __contains__(self, name) -> bool:
        return name in self._written or (name not in self._deleted and name in self._store)

    def __iter__(self):
        yield from self._written
        yield from (name for name in self._store if name not in self._written and name not in self._deleted)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class CastStore(StoreView):
    """A view of a TensorStore in which the tensors named in `cast` read in their new dtype, each cast when it is
    asked for: a retyped or widened IR holds its weights once, in their own dtype, plus the tensor in use in the new
    one (a copy of every weight would be 27 GB in fp32 for a 7B model, 54 GB in float64). Writes and deletions (a
    pass replacing weights) stay in the view: the store under it is never changed."""

    def __init__(self, store, cast: dict[str, torch.dtype]):
        super().__init__(store)
        self._cast = cast

    def _read(self, name: str):
        tensor = self._store[name]
        dtype = self._cast.get(name)
        return tensor if dtype is None else tensor.to(dtype)


def retyped(graph: Graph, store, dtype) -> tuple[Graph, CastStore]:
    """The graph with every float TensorRef in `dtype` (a torch dtype), and a view of the store that reads those
    tensors cast (CastStore: each cast when used; integer tensors as they are). Every TensorRef is checked against
    the store here, as resolve() checks it."""
    name = str(dtype).removeprefix("torch.")
    result, cast = graph.copy(), {}
    for node_name in graph:
        node = graph[node_name]
        changes = {}
        for field, ref in node.tensor_refs().items():
            if ref.resolve(store).is_floating_point():
                cast[ref.name] = dtype
                changes[field] = dataclasses.replace(ref, dtype=name)
        if changes:
            result.replace(node_name, dataclasses.replace(node, **changes))
    return result, CastStore(store, cast)


def widened(graph: Graph, store) -> tuple[Graph, Mapping]:
    """(graph, store) with bf16/fp16 weights widened to float32 (retyped: a view that widens each tensor when it is
    used), or as they are when none is narrower: the simulator and the exporters compute in float32 whatever dtype
    the IR keeps its weights in."""
    if not any(ref.dtype in HALF_DTYPES for ref in tensor_refs(graph).values()):
        return graph, store
    return retyped(graph, store, torch_dtype("float32"))
