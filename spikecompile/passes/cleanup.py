"""cleanup: remove dead nodes (no path to an Output) and identities, reconnecting edges with their ports.

Identities are a Rotation that is the identity matrix (n = 1, no sign flip) and a Rotation followed only by its
inverse (same kind, n and signs, the other `transpose`: x·Q·Qᵀ = x), which is removed with it. The producer
takes over the removed node's out-edges, each keeping the consumer's port. An identity is kept (and listed in
the notes) when its producer already feeds one of its consumers on another port: a DiGraph holds one edge per
(producer, consumer) pair, so that consumer could not take both.
"""

from __future__ import annotations

from ..errors import SpikecompileError
from ..ir import Graph, IRNode, Output, Rotation, validate
from .manager import Pass, PassContext, PassResult, register_pass


def is_identity(node: IRNode) -> bool:
    """Whether the node computes y = x at run time."""
    return isinstance(node, Rotation) and node.n == 1 and (node.signs is None or bool((node.signs == 1).all()))


def is_inverse_pair(first: IRNode, second: IRNode) -> bool:
    """Whether `second` undoes `first`: the same rotation, one of them transposed."""
    return (isinstance(first, Rotation) and isinstance(second, Rotation) and first.transpose != second.transpose
            and (first.kind, first.n) == (second.kind, second.n)
            and (first.signs is None) == (second.signs is None)
            and (first.signs is None or bool((first.signs == second.signs).all())))


def dead_nodes(graph: Graph) -> set[str]:
    """The nodes with no path to an Output."""
    live = {name for name in graph if isinstance(graph[name], Output)}
    for output in list(live):
        live |= graph.ancestors(output)
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
        result = graph.copy()
        dead = dead_nodes(result)
        result.remove_nodes(dead)
        removed, kept = 0, []
        for name in result.topological_order():
            if name not in result or not isinstance(result[name], Rotation):
                continue
            consumers = result.consumers(name)
            if len(consumers) == 1 and is_inverse_pair(result[name], result[consumers[0]]):
                pair = [name, consumers[0]]
            elif is_identity(result[name]):
                pair = [name]
            else:
                continue
            (producer,) = result.inputs(name).values()
            if any(result.has_edge(producer, consumer) for consumer in result.consumers(pair[-1])):
                kept.append(name)
                continue
            for member in pair:
                bypass(result, member)
            removed += len(pair)
        notes = {"dead_removed": len(dead), "identity_removed": removed, "identity_kept": kept}
        return PassResult(result, bool(dead or removed), notes)


def bypass(graph: Graph, name: str) -> None:
    """Remove single-input node `name`, feeding its consumers from its producer on the same ports (the caller
    checked that the producer feeds none of them yet)."""
    (producer,) = graph.inputs(name).values()
    consumers = graph.out_edges(name)
    graph.remove_node(name)
    for _, consumer, port in consumers:
        graph.add_edge(producer, consumer, port)
