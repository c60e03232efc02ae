"""Trace a converted spiking LLaMA into the IR: a structured walk of the transformers modules (not torch.fx).

The walk follows what transformers' LLaMA forward computes with spikecompile's sites installed (sites.py),
in the same order, so interpret(trace(m)) reproduces m.logits to float rounding:

    input_ids → embed_tokens → per layer:
        input_layernorm → attn_norm site → q/k/v_proj → split heads → RoPE (q, k) → [KV prefix (k, v)]
        → q, k, v sites → scores (qk, GQA groups) → causal softmax → attn_probs site → pv → merge heads
        → o_proj_in site → o_proj → residual
        post_attention_layernorm → mlp_norm site → gate_proj → act_fn (SiLU) → silu site ─┐
                                                 → up_proj ─────────────────────────────→ product
        → [online Hadamard] → down_proj_in site → down_proj → residual
    → norm → final_norm site → lm_head → logits

Node names are module paths without the leading "model." ("layers.3.self_attn.q_proj"); a spike site's node
is its site name ("layers.3.attn_norm", "final_norm"); the few nodes without a module get a name under the
module they belong to ("layers.3.self_attn.scores"). Weights are TensorRefs to the model's state_dict keys;
the returned store is the state_dict itself plus the prefix caches ("prefix.layers.{i}.key" / ".value"), or, for
a weightless model on the meta device (build's: conversion.layered), its SpikingModel.store, which reads each part
of the model from the source when a tensor of it is asked for.

Rotations (conversion.rotation.rotate_llama): the online Hadamard before down_proj is always an explicit
Rotation(where="online"). The offline ones (residual stream Q, per-head H_h, the down_proj input side of H_i)
depend on how the model was loaded (SpikingModel.rotations): "applied", they live in the weights and are not
nodes; "explicit", the weights are the source's (norms folded) and each offline rotation is a Rotation(where=
"offline") beside the synapse it belongs to, for passes.fold_hadamard to fold:

    embed_tokens → Q                 attn_norm site → Qᵀ → q/k/v_proj     v_proj → H_h (per head)
    o_proj_in site → H_hᵀ → o_proj → Q    mlp_norm site → Qᵀ → gate/up_proj
    down_proj_in site → H_iᵀ → down_proj → Q                             final_norm site → Qᵀ → lm_head

The prefix's KV cache is the float model's keys and values on the prefix tokens: taken from the model's own
cache when its rotations are applied, else computed by interpreting the graph without the prefix, sites off.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..conversion.convert import SpikingModel, recorded_site_neuron
from ..conversion.rotation import OnlineHadamard
from ..conversion.sites import site_name
from ..errors import SpikecompileError
from ..hadamard import describe_hadamard
from ..ir import (
    ActivationMatmul, ElementwiseProduct, Embedding, Graph, Input, IRNode, KVPrefix, Linear, MergeHeads, Nonlinear,
    Output, PhaseNeuron, ResidualAdd, RoPE, Rotation, SplitHeads, TensorRef, validate,
)
from ..progress import bar

# rope types whose inv_freq is fixed at load time (the dynamic ones rescale it with the sequence length)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SILU_NAMES = ("silu", "swish")
LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj", "spike_sites"}
MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}


def trace(spiking: SpikingModel, progress: bool = False) -> tuple[Graph, dict[str, Tensor]]:
    """The IR graph of a converted model and its tensor store; SpikecompileError naming the module and op that
    the IR cannot represent. progress: a bar per decoder layer on a terminal's stderr (progress.bar)."""
    prefix = spiking.record.get("prefix")
    if not prefix:
        return _Tracer(spiking, None, progress).run()
    if spiking.rotations == "applied" and spiking.store is not None:
        caches = spiking.store.prefix_caches(prefix["token_ids"])
    elif spiking.rotations == "applied":
        caches = [(layer.keys[0], layer.values[0]) for layer in spiking.prefix.cache.layers]
    else:
        caches = _prefix_caches(spiking, prefix["token_ids"])
    return _Tracer(spiking, caches, progress).run()


def _prefix_caches(spiking: SpikingModel, token_ids: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Each layer's float keys (after RoPE) and values on the prefix tokens, from the graph without a prefix."""
    from ..ir.interpret import evaluate, sites_off

    tracer = _Tracer(spiking, None)
    graph, store = tracer.run()
    values = evaluate(graph, store, torch.tensor([token_ids]), {PhaseNeuron: sites_off})
    return [(values[key][0], values[value][0]) for key, value in tracer.kv_nodes]


def _unsupported(path: str, what: str) -> SpikecompileError:
    return SpikecompileError(f"trace: {path}: {what}; spikecompile traces LLaMA-style decoders only "
                             f"(RMSNorm, SiLU MLP, rotary attention without sliding window)")


def _dtype_name(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _identity(tensor: Tensor, parameter: Tensor | None = None) -> tuple:
    """Tensors with equal identities are one tensor (the same memory, shape and strides); a tensor without
    memory (meta device: the analytic mode's weightless models) is its module parameter (tied weights share
    one), or only itself."""
    if tensor.is_meta:
        return ("meta", id(parameter if parameter is not None else tensor))
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride()


def _check_children(module: nn.Module, path: str, expected: set[str]) -> None:
    for name, child in module.named_children():
        if name not in expected:
            raise _unsupported(f"{path}.{name}", f"unexpected module {type(child).__name__}")


class _Tracer:
    """One walk; prefix_caches: each layer's (key, value) prefix cache [kv_heads, P, head_dim], or None to
    trace without the prefix (positions from 0, no KVPrefix nodes); progress: a bar per decoder layer."""

    def __init__(self, spiking: SpikingModel, prefix_caches: list[tuple[Tensor, Tensor]] | None,
                 progress: bool = False):
        self.spiking = spiking
        self.progress = progress
        self.model = spiking.model
        self.config = self.model.config
        self.paths = {module: name for name, module in self.model.named_modules()}
        # the shapes and dtypes of the model's tensors; a weightless (meta) model's tensors are in spiking.store
        self.tensors: dict[str, Tensor] = dict(self.model.state_dict())
        self.store = self.tensors if spiking.store is None else spiking.store
        parameters = dict(self.model.named_parameters(remove_duplicate=False))
        self.identities = {key: _identity(tensor, parameters.get(key)) for key, tensor in self.tensors.items()}
        self.canonical_keys = {}
        for key, identity in self.identities.items():
            self.canonical_keys.setdefault(identity, key)
        self.graph = Graph()
        self.prefix_caches = prefix_caches
        self.prefix_length = len(spiking.record["prefix"]["token_ids"]) if prefix_caches is not None else 0
        rotation = spiking.record.get("rotation")
        self.offline_rotation = rotation if spiking.rotations == "explicit" else None
        self.kv_nodes: list[tuple[str, str]] = []  # per layer: the nodes giving the keys and values to cache

    def add(self, name: str, node: IRNode, *sources: str, **ports: str) -> str:
        """Add node `name` fed by `sources` (its only input) or by `ports` (port → producer); return the name."""
        self.graph.add_node(name, node)
        for source in sources:
            self.graph.add_edge(source, name)
        for port, source in ports.items():
            self.graph.add_edge(source, name, port)
        return name

    def ref(self, key: str) -> TensorRef:
        """A reference to store[key], by the first key holding the same tensor (tied weights: one name)."""
        if key in self.tensors:
            tensor = self.tensors[key]
            identity = self.identities.get(key) or _identity(tensor)
        else:  # written to a weightless model's store (a prefix cache): its own tensor, which the store may reload
            tensor, identity = self.store[key], ("written", key)
        key = self.canonical_keys.setdefault(identity, key)
        return TensorRef(key, tuple(tensor.shape), _dtype_name(tensor))

    def node_name(self, module: nn.Module) -> str:
        return self.paths[module].removeprefix("model.")

    def site(self, layer: int | None, kind: str, source: str) -> str:
        name = site_name(layer, kind)
        neuron = PhaseNeuron.from_params(name, *recorded_site_neuron(self.spiking.record, name))
        return self.add(name, neuron, source)

    def linear(self, module: nn.Module, source: str) -> str:
        path = self.paths[module]
        if type(module) is not nn.Linear:
            raise _unsupported(path, f"{type(module).__name__} is not a torch.nn.Linear")
        bias = self.ref(f"{path}.bias") if module.bias is not None else None
        return self.add(self.node_name(module), Linear(weight=self.ref(f"{path}.weight"), bias=bias), source)

    def rmsnorm(self, module: nn.Module, source: str) -> str:
        path = self.paths[module]
        eps = getattr(module, "variance_epsilon", None)
        weight = getattr(module, "weight", None)
        if not type(module).__name__.endswith("RMSNorm") or eps is None or weight is None or weight.dim() != 1 \
                or getattr(module, "bias", None) is not None:
            raise _unsupported(path, f"{type(module).__name__} is not an RMSNorm x / √(mean(x²) + eps) · γ")
        return self.add(self.node_name(module), Nonlinear(function="rmsnorm", eps=float(eps),
                                                          weight=self.ref(f"{path}.weight")), source)

    def offline(self, name: str, source: str, basis: str, transpose: bool, width: int | None = None) -> str:
        """An offline Rotation(name) of `source` when the rotations are explicit, else `source` itself.
        basis: "residual" (Q = H_d·diag(signs)), "head" (H_h per head) or "intermediate" (H_i, width given)."""
        if self.offline_rotation is None:
            return source
        signs = None
        if basis == "residual":
            signs = torch.tensor(self.offline_rotation["residual"]["signs"], dtype=torch.int8)
            width = signs.numel()
        elif basis == "head":
            width = self.offline_rotation["head"]["n"]
        return self.add(name, Rotation(n=width, where="offline", construction=describe_hadamard(width), signs=signs,
                                       transpose=transpose), source)

    def run(self) -> tuple[Graph, dict[str, Tensor]]:
        base = self.model.model
        _check_children(base, "model", {"embed_tokens", "layers", "norm", "rotary_emb"})
        if type(base.embed_tokens) is not nn.Embedding:
            raise _unsupported("model.embed_tokens", f"{type(base.embed_tokens).__name__} is not a torch.nn.Embedding")
        hidden = self.add("embed_tokens", Embedding(weight=self.ref("model.embed_tokens.weight")),
                          self.add("input_ids", Input(shape=("batch", "seq"), dtype="int64")))
        hidden = self.offline("embed_tokens.output_rotation", hidden, "residual", transpose=False)
        rope = self.rope(base.rotary_emb)
        for index, layer in enumerate(bar(base.layers, desc="trace", unit="layer", progress=self.progress)):
            hidden = self.decoder_layer(index, layer, hidden, rope)
        normed = self.site(None, "final_norm", self.rmsnorm(base.norm, hidden))
        normed = self.offline("lm_head.input_rotation", normed, "residual", transpose=True)
        self.add("logits", Output(), self.linear(self.model.lm_head, normed))
        validate(self.graph)
        return self.graph, self.store

    def rope(self, rotary: nn.Module) -> dict:
        """The fields every RoPE node shares; the window's positions start after the prefix."""
        rope_type = getattr(rotary, "rope_type", None)
        if rope_type not in STATIC_ROPE_TYPES:
            raise _unsupported("model.rotary_emb", f"rope type {rope_type!r} (supported: {', '.join(STATIC_ROPE_TYPES)})")
        return {"inv_freq": rotary.inv_freq.detach().float().clone(), "parameters": dict(self.config.rope_parameters),
                "attention_scaling": float(rotary.attention_scaling), "position_offset": self.prefix_length}

    def decoder_layer(self, index: int, layer: nn.Module, hidden: str, rope: dict) -> str:
        path = self.paths[layer]
        _check_children(layer, path, LAYER_CHILDREN)
        normed = self.site(index, "attn_norm", self.rmsnorm(layer.input_layernorm, hidden))
        attended = self.add(f"layers.{index}.attn_residual", ResidualAdd(), residual=hidden,
                            branch=self.attention(index, layer.self_attn, normed, rope))
        normed = self.site(index, "mlp_norm", self.rmsnorm(layer.post_attention_layernorm, attended))
        return self.add(f"layers.{index}.mlp_residual", ResidualAdd(), residual=attended,
                        branch=self.mlp(index, layer.mlp, normed))

    def attention(self, index: int, attention: nn.Module, normed: str, rope: dict) -> str:
        path, name = self.paths[attention], self.node_name(attention)
        _check_children(attention, path, ATTENTION_CHILDREN)
        window = getattr(self.config, "sliding_window", None)
        if window is not None:
            raise _unsupported(path, f"sliding-window attention (sliding_window={window})")
        head_dim, groups = attention.head_dim, attention.num_key_value_groups
        heads = attention.q_proj.out_features // head_dim
        kv_heads = heads // groups

        normed = self.offline(f"{name}.input_rotation", normed, "residual", transpose=True)

        def heads_of(module: nn.Module, count: int, rotated: bool = False) -> str:
            projected = self.linear(module, normed)
            heads_name = f"{projected}.heads"
            if rotated:
                projected = self.offline(f"{projected}.output_rotation", projected, "head", transpose=False)
            return self.add(heads_name, SplitHeads(heads=count, head_dim=head_dim), projected)

        query = self.add(f"{name}.q_rope", RoPE(head_dim=head_dim, **rope), heads_of(attention.q_proj, heads))
        key = self.add(f"{name}.k_rope", RoPE(head_dim=head_dim, **rope), heads_of(attention.k_proj, kv_heads))
        value = heads_of(attention.v_proj, kv_heads, rotated=True)
        self.kv_nodes.append((key, value))
        if self.prefix_caches is not None:
            key = self.kv_prefix(index, "key", key)
            value = self.kv_prefix(index, "value", value)
        scores = self.add(f"{name}.scores", ActivationMatmul(which="qk", scaling=float(attention.scaling), groups=groups),
                          a=self.site(index, "q", query), b=self.site(index, "k", key))
        probs = self.site(index, "attn_probs", self.add(f"{name}.softmax", Nonlinear(function="softmax", causal=True),
                                                        scores))
        context = self.add(f"{name}.context", ActivationMatmul(which="pv", groups=groups),
                           a=probs, b=self.site(index, "v", value))
        merged = self.add(f"{name}.merge_heads", MergeHeads(heads=heads, head_dim=head_dim), context)
        spikes = self.offline(f"{name}.o_proj.input_rotation", self.site(index, "o_proj_in", merged), "head",
                              transpose=True)
        return self.offline(f"{name}.o_proj.output_rotation", self.linear(attention.o_proj, spikes), "residual",
                            transpose=False)

    def kv_prefix(self, index: int, which: str, source: str) -> str:
        cache = self.prefix_caches[index][0 if which == "key" else 1]
        key = f"prefix.layers.{index}.{which}"
        self.store[key] = cache
        token_ids = tuple(int(token) for token in self.spiking.record["prefix"]["token_ids"])
        return self.add(f"layers.{index}.self_attn.{which}_prefix",
                        KVPrefix(which=which, token_ids=token_ids, cache=self.ref(key)), source)

    def mlp(self, index: int, mlp: nn.Module, normed: str) -> str:
        path, name = self.paths[mlp], self.node_name(mlp)
        _check_children(mlp, path, MLP_CHILDREN)
        activation = getattr(self.config, "hidden_act", None)
        if activation not in SILU_NAMES:
            raise _unsupported(f"{path}.act_fn", f"activation {activation!r} ({type(mlp.act_fn).__name__}) is not SiLU")
        normed = self.offline(f"{name}.input_rotation", normed, "residual", transpose=True)
        gate = self.add(f"{name}.act_fn", Nonlinear(function="silu"), self.linear(mlp.gate_proj, normed))
        product = self.add(f"{name}.product", ElementwiseProduct(), a=self.site(index, "silu", gate),
                           b=self.linear(mlp.up_proj, normed))
        if any(isinstance(hook, OnlineHadamard) for hook in mlp.down_proj._forward_pre_hooks.values()):
            width = mlp.down_proj.in_features
            product = self.add(f"{name}.online_hadamard", Rotation(n=width, where="online",
                                                                   construction=describe_hadamard(width)), product)
        spikes = self.offline(f"{name}.down_proj.input_rotation", self.site(index, "down_proj_in", product),
                              "intermediate", transpose=True, width=mlp.down_proj.in_features)
        return self.offline(f"{name}.down_proj.output_rotation", self.linear(mlp.down_proj, spikes), "residual",
                            transpose=False)
