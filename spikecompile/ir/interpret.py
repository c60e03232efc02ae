"""A decoded-mode interpreter of IR graphs: every node computes its decoded equation (its docstring) on whole
tensors, and every PhaseNeuron returns x̂ (neuron.reference.phase_quantize). One function per node type, looked
up in RUNNERS; nothing here knows about any particular model.

Operations follow transformers' LLaMA order (RMSNorm in float32, RoPE with cos/sin built in float32, GQA by
repeating key/value heads), so a traced model gives its SpikingModel's logits to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SpikecompileError
from ..hadamard import apply_hadamard
from ..neuron import token_scales
from ..neuron.kernel import Prepared, prepare, quantize
from .base import IRNode, TensorStore
from .graph import Graph
from .linear import Embedding, Input, KVPrefix, Linear, MergeHeads, Output, ResidualAdd, RoPE, Rotation, SplitHeads
from .neurons import PhaseNeuron
from .nonlinear import ActivationMatmul, ElementwiseProduct, Nonlinear

Runner = Callable[[IRNode, dict[str, Tensor], TensorStore], Tensor]


@torch.no_grad()
def interpret(graph: Graph, store: TensorStore, ids: Tensor | dict[str, Tensor],
              overrides: dict[type[IRNode], Runner] | None = None) -> Tensor:
    """Run `graph` on token ids [batch, seq] (its one Input; or a dict of values by Input name) and return its
    one Output (the logits).

    overrides replace the rule of some node types (e.g. PhaseNeuron by the identity: every site off).
    """
    values = evaluate(graph, store, ids, overrides)
    (logits,) = [values[name] for name in graph if isinstance(graph[name], Output)]
    return logits


@torch.no_grad()
def evaluate(graph: Graph, store: TensorStore, ids: Tensor | dict[str, Tensor],
             overrides: dict[type[IRNode], Runner] | None = None) -> dict[str, Tensor]:
    """Every node's value when `graph` runs on `ids` (see interpret)."""
    runners = {**RUNNERS, **(overrides or {})}
    values = graph_inputs(graph, ids)
    for name in graph.topological_order():
        node = graph[name]
        if name in values:
            continue
        runner = runners.get(type(node))
        if runner is None:
            raise SpikecompileError(f"node {name}: the interpreter has no rule for {type(node).__name__}")
        inputs = {port: values[source] for port, source in graph.inputs(name).items()}
        try:
            values[name] = runner(node, inputs, store)
        except (RuntimeError, ValueError) as error:
            raise SpikecompileError(f"node {name}: {type(node).__name__}: {error}") from None
    return values


def graph_inputs(graph: Graph, given: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
    """The value of every Input node: `given` by name, or the one tensor for a graph with one Input."""
    names = [name for name in graph if isinstance(graph[name], Input)]
    if not isinstance(given, dict):
        if len(names) != 1:
            raise SpikecompileError(f"the graph has inputs {names}: pass a dict of values by name")
        given = {names[0]: given}
    if sorted(given) != sorted(names):
        raise SpikecompileError(f"the graph's inputs are {sorted(names)}, got values for {sorted(given)}")
    return dict(given)


def sites_off(node: PhaseNeuron, inputs, store) -> Tensor:
    """The override that turns every spike site off (the float model): x̂ = x."""
    return inputs["x"]


def _linear(node: Linear, inputs, store) -> Tensor:
    bias = node.bias.resolve(store) if node.bias is not None else None
    return F.linear(inputs["x"], node.weight.resolve(store), bias)


def _embedding(node: Embedding, inputs, store) -> Tensor:
    return F.embedding(inputs["ids"], node.weight.resolve(store))


def _rotation(node: Rotation, inputs, store) -> Tensor:
    x = inputs["x"]
    blocks = x.reshape(*x.shape[:-1], -1, node.n)
    if node.transpose:
        rotated = blocks @ node.matrix().to(x.dtype)
    else:  # the fast transform, as conversion.rotation.OnlineHadamard runs it in the model
        rotated = apply_hadamard(blocks, node.n)
        if node.signs is not None:
            rotated = rotated * node.signs.to(rotated.dtype)
    return rotated.reshape(x.shape)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(node: RoPE, inputs, store) -> Tensor:
    x = inputs["x"]
    cos, sin = (table.to(x.dtype) for table in node.tables(x.shape[-2], x.device))
    return x * cos + _rotate_half(x) * sin


def _split_heads(node: SplitHeads, inputs, store) -> Tensor:
    x = inputs["x"]
    return x.reshape(*x.shape[:-1], node.heads, node.head_dim).transpose(-3, -2)


def _merge_heads(node: MergeHeads, inputs, store) -> Tensor:
    x = inputs["x"].transpose(-3, -2).contiguous()
    return x.reshape(*x.shape[:-2], node.heads * node.head_dim)


def _kv_prefix(node: KVPrefix, inputs, store) -> Tensor:
    x = inputs["x"]
    cache = node.cache.resolve(store).to(x.device)
    return torch.cat([cache.expand(*x.shape[:-3], *cache.shape), x], dim=-2)


def _residual_add(node: ResidualAdd, inputs, store) -> Tensor:
    return inputs["residual"] + inputs["branch"]


def _rmsnorm(node: Nonlinear, x: Tensor, store, scratch: bool = False) -> Tensor:
    hidden = x.to(torch.float32)
    scale = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + node.eps)
    hidden = hidden.mul_(scale) if scratch and hidden is x else hidden * scale
    hidden = hidden.to(x.dtype)
    return node.weight.resolve(store) * hidden if node.weight is not None else hidden


def _softmax(node: Nonlinear, x: Tensor, store, scratch: bool = False) -> Tensor:
    if node.causal:
        queries, keys = x.shape[-2:]
        rows = torch.arange(queries, device=x.device)[:, None]
        future = torch.arange(keys, device=x.device)[None, :] > rows + (keys - queries)
        x = x.masked_fill_(future, float("-inf")) if scratch else x.masked_fill(future, float("-inf"))
    if x.dtype == torch.float32:  # the same values; the dtype= path runs at half the speed
        return F.softmax(x, dim=-1)
    return F.softmax(x, dim=-1, dtype=torch.float32).to(x.dtype)


NONLINEAR_FUNCTIONS = {
    "rmsnorm": _rmsnorm,
    "softmax": _softmax,
    "silu": lambda node, x, store, scratch=False: F.silu(x, inplace=scratch),
}
"""f(node, x, store, scratch=False) -> f(x); with scratch=True x is a temporary f may overwrite (the event rule's
running sums): the same values, fewer fresh tensors."""


def _nonlinear(node: Nonlinear, inputs, store) -> Tensor:
    return NONLINEAR_FUNCTIONS[node.function](node, inputs["x"], store)


def _activation_matmul(node: ActivationMatmul, inputs, store) -> Tensor:
    b = inputs["b"].repeat_interleave(node.groups, dim=-3) if node.groups > 1 else inputs["b"]
    product = torch.matmul(inputs["a"], b.transpose(-2, -1) if node.transpose_b else b)
    return product.mul_(node.scaling) if node.scaling != 1.0 else product


def _elementwise_product(node: ElementwiseProduct, inputs, store) -> Tensor:
    return inputs["a"] * inputs["b"]


_NEURONS: WeakKeyDictionary = WeakKeyDictionary()


def neuron_of(node: PhaseNeuron) -> Prepared:
    """The node's neuron: its parameters with the fused kernel's schedule, built once per node (nodes are frozen)."""
    neuron = _NEURONS.get(node)
    if neuron is None:
        neuron = _NEURONS[node] = prepare(node.params())
    return neuron


def _phase_neuron(node: PhaseNeuron, inputs, store) -> Tensor:
    """phase_quantize, in one fused pass (neuron.kernel; bitwise equal, the reference where it cannot run). A
    bf16/fp16 graph's neurons run in float32, as the converted model's sites do (conversion.sites)."""
    x = inputs["x"]
    if x.dtype in (torch.bfloat16, torch.float16):
        return _phase_neuron(node, {"x": x.float()}, store).to(x.dtype)
    if node.token_levels:
        scale = token_scales(x, node.token_levels)
        return quantize(x / scale, neuron_of(node)) * scale
    return quantize(x, neuron_of(node))


RUNNERS: dict[type[IRNode], Runner] = {
    Output: lambda node, inputs, store: inputs["x"],
    Embedding: _embedding,
    Linear: _linear,
    Rotation: _rotation,
    RoPE: _rope,
    SplitHeads: _split_heads,
    MergeHeads: _merge_heads,
    KVPrefix: _kv_prefix,
    ResidualAdd: _residual_add,
    Nonlinear: _nonlinear,
    ActivationMatmul: _activation_matmul,
    ElementwiseProduct: _elementwise_product,
    PhaseNeuron: _phase_neuron,
}
