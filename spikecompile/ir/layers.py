"""Decoder layers by name: which layer a node belongs to, and a layer range or one block as a graph of its own.

Node and site names follow the model's module paths, so decoder layer N is every name that starts with
"layers.N." ("layers.3.mlp.down_proj", the site "layers.3.silu"); the embedding, final norm and lm_head belong to
no layer.
"""

from __future__ import annotations

import re

from ..errors import SpikecompileError
from .base import TensorType
from .graph import Graph, validate
from .linear import Input, Output

LAYER_NAME = re.compile(r"^layers\.(\d+)\.")
BLOCKS = {"attn": ("input_layernorm", "attn_residual"), "mlp": ("post_attention_layernorm", "mlp_residual")}


def layer_of(name: str) -> int | None:
    """N for a node or site name "layers.N.…", None outside the decoder layers."""
    match = LAYER_NAME.match(name)
    return int(match.group(1)) if match else None


def layer_indices(graph: Graph) -> list[int]:
    """The decoder layers N that node names "layers.N.…" mention, ascending."""
    return sorted({layer for name in graph if (layer := layer_of(name)) is not None})


def decoder_block(graph: Graph, layer: int, which: str) -> Graph:
    """The attention or MLP block of decoder layer `layer` as a graph of its own (nodes copied, not cloned):
    an Input "block_input" (the residual stream entering the block's norm, arriving whole at t = 0) feeds the
    norm; every node on a path from the norm to the block's branch into the residual add is kept; an Output
    "block_output" takes that branch. SpikecompileError naming what is missing."""
    if which not in BLOCKS:
        raise SpikecompileError(f"block {which!r}: choose one of {', '.join(BLOCKS)}")
    norm_name, residual_name = (f"layers.{layer}.{part}" for part in BLOCKS[which])
    if norm_name not in graph or residual_name not in graph:
        layers = layer_indices(graph)
        raise SpikecompileError(f"block {which} of layer {layer}: not in the graph (layers: "
                                f"{f'{layers[0]}..{layers[-1]}' if layers else 'none'})")
    branch_end = graph.inputs(residual_name)["branch"]
    keep = (graph.descendants(norm_name) & graph.ancestors(branch_end)) | {norm_name, branch_end}
    outside = {source for name in keep for source in graph.producers(name) if source not in keep}
    unexpected = outside - {graph.inputs(norm_name)["x"]}
    if unexpected:
        raise SpikecompileError(f"block {which} of layer {layer}: fed from outside by {', '.join(sorted(unexpected))}")
    types = validate(graph)
    block = graph.induced(keep)
    block.add_node("block_input", _input_node(types[graph.inputs(norm_name)["x"]], graph[norm_name].timesteps))
    block.add_edge("block_input", norm_name)
    block.add_node("block_output", Output(timesteps=graph[residual_name].timesteps))
    block.add_edge(branch_end, "block_output")
    validate(block)
    return block


def decoder_layers(graph: Graph, first: int, last: int) -> tuple[Graph, str]:
    """Decoder layers first..last as a graph of their own: an Input "layers_input" takes the place of the
    residual stream entering layer `first` (returned: the node that computes it), an Output "layers_output"
    takes the stream leaving layer `last`."""
    names = [name for name in graph if (layer := layer_of(name)) is not None and first <= layer <= last]
    inside = set(names)
    residual = f"layers.{last}.mlp_residual"
    if residual not in inside:
        raise SpikecompileError(f"layers {first}..{last}: not in the graph")
    # in graph order, so the part's edges (and what is emitted from it) do not depend on set order
    fed = [(source, target, port) for target in names for source, _, port in graph.in_edges(target)
           if source not in inside]
    sources = {source for source, _, _ in fed}
    if len(sources) != 1:
        raise SpikecompileError(f"layers {first}..{last}: fed from outside by {', '.join(sorted(sources))}, "
                                f"expected the residual stream alone")
    (source,) = sources
    part = graph.induced(names)
    part.add_node("layers_input", _input_node(validate(graph)[source], graph[source].timesteps))
    for _, target, port in fed:
        part.add_edge("layers_input", target, port)
    part.add_node("layers_output", Output(timesteps=graph[residual].timesteps))
    part.add_edge(residual, "layers_output")
    validate(part)
    return part, source


def _input_node(of: TensorType, timesteps: int | None) -> Input:
    """An Input standing for a value of type `of` computed outside the part."""
    return Input(shape=of.shape, dtype=of.dtype, timesteps=timesteps)
