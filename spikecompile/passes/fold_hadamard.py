"""fold_hadamard: multiply every offline Rotation into its neighbouring synapse weights and drop the node.

A Rotation y = x·M (M = Q or Qᵀ on each block of n channels, ir.Rotation.matrix) folds exactly into

    its producer, when that is a synapse feeding nothing else:
        Linear     W ← Mᵀ·W (per block of output rows),  b ← b·M
        Embedding  E ← E·M  (per block of columns)
    else its consumers, when all are Linear:
        Linear     W ← W·Mᵀ (per block of input columns)

tried in that order. Products are taken in float64, by M's Kronecker factors (no dense n×n matrix), by blocks of
rows, and cast back to each weight's dtype once, after every rotation touching that weight is folded (down_proj
takes one on each side). Folded weights go into the store
under new keys "folded.<node name>.weight" / ".bias" (the store's existing tensors are never changed; with
CompileInputs.release_replaced, a replaced tensor that no node references any more is dropped from the store). An
offline rotation that fits neither rule (e.g. between two nonlinear nodes) becomes where="online": the graph
still computes the same, and the notes list it. Online rotations are left as they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import torch
from torch import Tensor

from ..errors import SpikecompileError
from ..hadamard import sylvester_rows
from ..ir import Embedding, Graph, Linear, Rotation, TensorRef, validate
from ..ir.base import torch_dtype
from .cleanup import bypass
from .context import CompileInputs
from .manager import Pass, PassContext, PassResult, register_pass

SYNAPSES = (Linear, Embedding)
BLOCK_BYTES = 64 * 2**20
"""float64 rows rotated at a time (fold_hadamard's _Weights): blocks of rows, each cast back to the weight's dtype."""


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
        weights = _Weights(result, store, release=context.shared.release_replaced)
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
                 "weights_rewritten": len(weights.pending), "made_online": made_online}
        return PassResult(result, bool(into_producer or into_consumers or made_online), notes)


class _Weights:
    """The synapse weights being rotated. Each node's rotations are recorded in order and applied at commit, in
    float64, one node at a time: at most one node's float64 copies exist at once (a 7B down_proj is 0.36 GB)."""

    def __init__(self, graph: Graph, store: dict[str, Tensor], release: bool = False, block_bytes: int = BLOCK_BYTES):
        self.graph, self.store, self.release, self.block_bytes = graph, store, release, block_bytes
        self.pending: dict[str, list[tuple[str, Rotation]]] = {}

    def rotate_output(self, name: str, rotation: Rotation) -> None:
        """The synapse's output y becomes y·M (module docstring)."""
        self.pending.setdefault(name, []).append(("output", rotation))

    def rotate_input(self, name: str, rotation: Rotation) -> None:
        """The Linear's input x becomes x·M, absorbed as W ← W·Mᵀ."""
        self.pending.setdefault(name, []).append(("input", rotation))

    def _rotated(self, node: Linear | Embedding, steps: list[tuple[str, Rotation]]) -> dict[str, Tensor]:
        """The node's tensors with `steps` applied, in float64 by blocks of rows of at most BLOCK_BYTES and cast back
        per block: a 128256-row vocabulary never exists whole in float64. A Linear's output rotation (W ← Mᵀ·W)
        mixes each n rows, so its blocks hold whole groups of n rows; every other step is row by row."""
        weight = node.weight.resolve(self.store)
        group = math.lcm(1, *(rotation.n for side, rotation in steps if side == "output" and isinstance(node, Linear)))
        rows = max(group, self.block_bytes // (8 * max(1, weight[0].numel())) // group * group)
        rotated = torch.empty_like(weight, memory_format=torch.contiguous_format)
        # input: W·Mᵀ; output: E·M on an Embedding's columns, Mᵀ·W = (Wᵀ·M)ᵀ on each n rows of a Linear
        factored = [(side, rotation.factors(transposed=side == "input")) for side, rotation in steps]
        for start in range(0, weight.shape[0], rows):
            part = weight[start:start + rows].double()
            for side, factors in factored:
                if side == "output" and isinstance(node, Linear):
                    groups = part.reshape(-1, factors[0].numel(), part.shape[1]).transpose(1, 2)
                    part = _times(groups, factors).transpose(1, 2).reshape(part.shape)
                else:
                    part = _times(part, factors)
            rotated[start:start + rows] = part.to(rotated.dtype)
        tensors = {"weight": rotated}
        if getattr(node, "bias", None) is not None:
            bias = node.bias.resolve(self.store).double()
            for side, factors in factored:
                if side == "output":
                    bias = _times(bias, factors)
            tensors["bias"] = bias
        return tensors

    def commit(self) -> None:
        """Per rotated node: its rotations in float64, the results cast back to each tensor's dtype and stored under
        new keys, the node pointed there. With `release`, a replaced tensor no node references any more leaves the
        store at once (its memory is freed when nothing else holds it)."""
        users = Counter(ref.name for name in self.graph for ref in self.graph[name].tensor_refs().values())
        for name, steps in self.pending.items():
            node = self.graph[name]
            refs = {}
            for field, tensor in self._rotated(node, steps).items():
                old: TensorRef = getattr(node, field)
                key = f"folded.{name}.{field}"
                self.store[key] = tensor.to(torch_dtype(old.dtype)).contiguous()
                refs[field] = dataclasses.replace(old, name=key)
                users[old.name] -= 1
                if self.release and users[old.name] == 0:
                    del self.store[old.name]
            self.graph.replace(name, dataclasses.replace(node, **refs))


DENSE_SYLVESTER = 128
"""Up to this width the Sylvester factor A is applied as one dense product (SmolLM2's 16 and 128: the bits every
earlier build folded); above it as its own Kronecker factors (hadamard.sylvester_rows): at 4096, 128
multiply-adds per element instead of 4096."""


def _times(rows: Tensor, factors: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """rows·M on each block of n entries of the last dim, M given as Rotation.factors (before, A, B, after): (Aᵀ·X)·B
    on each block's (2^a, K) view X, no n×n matrix. ir.linear.rotate_by_factors computes Aᵀ·(X·B), the order the
    fixed-point run shares with the Lava runtime; the fold keeps its own order so that built IRs keep their bits.
    A is Sylvester's (symmetric) H_{2^a}/√2^a: wider than DENSE_SYLVESTER, Aᵀ·X = (Xᵀ·A)ᵀ by its factors."""
    before, left, right, after = factors
    shape = (left.shape[0], right.shape[0])
    blocks = rows.reshape(-1, *shape) * before.view(shape)
    if shape[0] > DENSE_SYLVESTER:
        mixed = sylvester_rows(blocks.transpose(1, 2)).transpose(1, 2)
    else:
        mixed = torch.matmul(left.T, blocks)
    return (torch.matmul(mixed, right) * after.view(shape)).reshape(rows.shape)
