"""fold_hadamard: multiply every offline Rotation into its neighbouring synapse weights and drop the node.

A Rotation y = x·M (M = Q or Qᵀ on each block of n channels, ir.Rotation.matrix) folds exactly into

    its producer, when that is a synapse feeding nothing else:
        Linear     W ← Mᵀ·W (per block of output rows),  b ← b·M
        Embedding  E ← E·M  (per block of columns)
    else its consumers, when all are Linear:
        Linear     W ← W·Mᵀ (per block of input columns)

tried in that order. Products are taken in float64 and cast back to each weight's dtype once, after every
rotation touching that weight is folded (down_proj takes one on each side). Folded weights go into the store
under new keys "folded.<node name>.weight" / ".bias" (the store's existing tensors are never changed). An
offline rotation that fits neither rule (e.g. between two nonlinear nodes) becomes where="online": the graph
still computes the same, and the notes list it. Online rotations are left as they are.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..errors import SpikecompileError
from ..ir import Embedding, Graph, Linear, Rotation, TensorRef, validate
from ..ir.base import torch_dtype
from .cleanup import bypass
from .context import CompileInputs
from .manager import Pass, PassContext, PassResult, register_pass

SYNAPSES = (Linear, Embedding)


def _offline(graph: Graph) -> list[str]:
    return [name for name in graph.topological_order()
            if isinstance(graph[name], Rotation) and graph[name].where == "offline"]


@register_pass
class FoldHadamard(Pass):
    name = "fold_hadamard"
    description = "fold offline Rotation nodes into the neighbouring synapse weights; online ones stay"
    after = ("cleanup",)  # cleanup first cancels rotation pairs that need no folding at all

    def ensures(self, graph: Graph) -> None:
        left = _offline(graph)
        if left:
            raise SpikecompileError(f"node {left[0]}: offline rotation still in the graph after fold_hadamard")
        validate(graph)

    def run(self, graph: Graph, context: PassContext) -> PassResult:
        if not isinstance(context.shared, CompileInputs):
            raise SpikecompileError("fold_hadamard needs the tensor store: run the pipeline with "
                                    "shared=CompileInputs(store=...)")
        store = context.shared.store
        result = graph.copy()
        weights = _Weights(result, store)
        into_producer = into_consumers = 0
        made_online = []
        for name in _offline(result):
            rotation: Rotation = result[name]
            (producer,) = result.inputs(name).values()
            consumers = result.consumers(name)
            if isinstance(result[producer], SYNAPSES) and len(result.consumers(producer)) == 1:
                weights.rotate_output(producer, rotation)
                into_producer += 1
            elif consumers and all(isinstance(result[consumer], Linear) for consumer in consumers) \
                    and not any(result.has_edge(producer, consumer) for consumer in consumers):
                for consumer in consumers:
                    weights.rotate_input(consumer, rotation)
                into_consumers += 1
            else:
                result.replace(name, dataclasses.replace(rotation, where="online"))
                made_online.append(name)
                continue
            bypass(result, name)
        weights.commit()
        notes = {"folded_into_producer": into_producer, "folded_into_consumers": into_consumers,
                 "weights_rewritten": len(weights.working), "made_online": made_online}
        return PassResult(result, bool(into_producer or into_consumers or made_online), notes)


class _Weights:
    """float64 working copies of the synapse weights being rotated, written back as new store entries."""

    def __init__(self, graph: Graph, store: dict[str, Tensor]):
        self.graph, self.store = graph, store
        self.working: dict[str, dict[str, Tensor]] = {}

    def _get(self, name: str) -> dict[str, Tensor]:
        if name not in self.working:
            node = self.graph[name]
            bias = getattr(node, "bias", None)
            self.working[name] = {"weight": node.weight.resolve(self.store).double()}
            if bias is not None:
                self.working[name]["bias"] = bias.resolve(self.store).double()
        return self.working[name]

    def rotate_output(self, name: str, rotation: Rotation) -> None:
        """The synapse's output y becomes y·M (module docstring)."""
        tensors, m, n = self._get(name), rotation.matrix(), rotation.n
        weight = tensors["weight"]
        if isinstance(self.graph[name], Embedding):
            tensors["weight"] = (weight.reshape(weight.shape[0], -1, n) @ m).reshape(weight.shape)
        else:
            tensors["weight"] = torch.einsum("kn,bki->bni", m, weight.reshape(-1, n, weight.shape[1])).reshape(weight.shape)
            if "bias" in tensors:
                tensors["bias"] = (tensors["bias"].reshape(-1, n) @ m).reshape(-1)

    def rotate_input(self, name: str, rotation: Rotation) -> None:
        """The Linear's input x becomes x·M, absorbed as W ← W·Mᵀ."""
        tensors = self._get(name)
        weight = tensors["weight"]
        tensors["weight"] = (weight.reshape(weight.shape[0], -1, rotation.n) @ rotation.matrix().T).reshape(weight.shape)

    def commit(self) -> None:
        """Cast each rewritten tensor back to its dtype, store it under a new key and point the node there."""
        for name, tensors in self.working.items():
            node = self.graph[name]
            refs = {}
            for field, tensor in tensors.items():
                old: TensorRef = getattr(node, field)
                key = f"folded.{name}.{field}"
                self.store[key] = tensor.to(torch_dtype(old.dtype)).contiguous()
                refs[field] = dataclasses.replace(old, name=key)
            self.graph.replace(name, dataclasses.replace(node, **refs))
