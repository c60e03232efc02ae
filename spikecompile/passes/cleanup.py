"""cleanup: remove dead nodes (no path to an Output) and identity nodes, reconnecting edges with their ports.

An identity node is one whose run-time output is its input: today an offline Rotation (its Q is folded into the
neighbouring weights; the node only records the basis of the values on its edge, which this pass drops). Its
producer takes over its out-edges, each keeping the consumer's port. An identity node is kept (and counted in
the notes) when its producer already feeds one of its consumers on another port: a DiGraph holds one edge per
(producer, consumer) pair, so that consumer could not take both.
"""

from __future__ import annotations

import networkx as nx

from ..errors import SpikecompileError
from ..ir import Graph, IRNode, Output, Rotation, validate
from .manager import Pass, PassContext, PassResult, register_pass


def is_identity(node: IRNode) -> bool:
    """Whether the node computes y = x at run time."""
    return isinstance(node, Rotation) and node.where == "offline"


def dead_nodes(graph: Graph) -> set[str]:
    """The nodes with no path to an Output."""
    live = {name for name in graph if isinstance(graph[name], Output)}
    for output in list(live):
        live |= nx.ancestors(graph.nx, output)
    return set(graph) - live


@register_pass
class Cleanup(Pass):
    name = "cleanup"
    description = "remove dead nodes (no path to an Output) and identity nodes, keeping edge ports"
    before = ("assign_timesteps",)  # dead branches must not take part in the choice of T

    def requires(self, graph: Graph) -> None:
        if not any(isinstance(graph[name], Output) for name in graph):
            raise SpikecompileError("the graph has no Output node: every node would be dead")

    def ensures(self, graph: Graph) -> None:
        validate(graph)
        dead = dead_nodes(graph)
        if dead:
            raise SpikecompileError(f"node {min(dead)}: dead (no path to an Output) after cleanup")

    def run(self, graph: Graph, context: PassContext) -> PassResult:
        result = Graph(graph.nx.copy())
        dead = dead_nodes(result)
        result.nx.remove_nodes_from(dead)
        removed, kept = 0, []
        for name in [name for name in result.topological_order() if is_identity(result[name])]:
            if _bypass(result, name):
                removed += 1
            else:
                kept.append(name)
        notes = {"dead_removed": len(dead), "identity_removed": removed, "identity_kept": kept}
        return PassResult(result, bool(dead or removed), notes)


def _bypass(graph: Graph, name: str) -> bool:
    """Remove identity node `name`, feeding its consumers from its producer on the same ports; False (graph
    unchanged) if the producer already feeds one of them."""
    (producer,) = graph.inputs(name).values()
    consumers = list(graph.nx.out_edges(name, data="port"))
    if any(graph.nx.has_edge(producer, consumer) for _, consumer, _ in consumers):
        return False
    graph.nx.remove_node(name)
    for _, consumer, port in consumers:
        graph.add_edge(producer, consumer, port)
    return True
