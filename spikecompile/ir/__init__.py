"""The intermediate representation: typed nodes (one module per family, each node's docstring its equation),
weights by reference, a networkx graph with a validator, and an on-disk format (graph.json +
tensors.safetensors, and weights.safetensors when written with the store). The frontend traces a model into it,
passes rewrite it, backends lower it. Equations and formats: docs/ir.md.

    base       TensorType, TensorRef, TensorStore, IRNode and the NODE_TYPES registry
    linear     Input, Output, Embedding, Linear, Rotation, RoPE, SplitHeads, MergeHeads, KVPrefix, ResidualAdd
    nonlinear  Nonlinear (rmsnorm, softmax, silu), ActivationMatmul, ElementwiseProduct
    neurons    PhaseNeuron
    graph      Graph (nodes, edges and the rewrites passes make), validate, tensor_refs, retyped and widened
               (CastStore views, on StoreView: a view of a store whose writes stay in the view)
    layers     layer_of, layer_indices, decoder_block, decoder_layers: decoder layers by node name
    serialize  write, read, read_weights
    interpret  interpret(graph, store, ids) -> logits: the decoded-mode semantics, one function per node type
               (evaluate: every node's value; sites_off: the override that runs the float model), the reference
               every pass and backend is checked against
"""

from .base import NODE_TYPES, IRNode, TensorRef, TensorStore, TensorType
from .graph import CastStore, Graph, StoreView, retyped, tensor_refs, validate, widened
from .interpret import evaluate, interpret, sites_off
from .layers import decoder_block, decoder_layers, layer_indices, layer_of
from .linear import Embedding, Input, KVPrefix, Linear, MergeHeads, Output, ResidualAdd, RoPE, Rotation, SplitHeads
from .neurons import PhaseNeuron
from .nonlinear import ActivationMatmul, ElementwiseProduct, Nonlinear
from .serialize import read, read_weights, write

__all__ = [
    "NODE_TYPES", "IRNode", "TensorRef", "TensorStore", "TensorType", "CastStore", "StoreView", "Graph", "retyped",
    "validate", "widened", "read", "read_weights", "tensor_refs", "write", "Input", "Output", "Embedding", "Linear",
    "Rotation", "RoPE", "SplitHeads", "MergeHeads",
    "KVPrefix", "ResidualAdd", "PhaseNeuron", "Nonlinear", "ActivationMatmul", "ElementwiseProduct", "layer_of",
    "layer_indices", "decoder_block", "decoder_layers", "evaluate", "interpret", "sites_off",
]
