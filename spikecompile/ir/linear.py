"""Graph boundaries and linear nodes: in event form each maps every step on its own, y_t = L(x_t), and a
constant term (a bias, an embedding row, a prefix cache, a graph input) enters once, at t = 0 — so the running
sum is Y_t = L(X_t) + c at every t, exactly (docs/method.md §3).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..hadamard import describe_hadamard, hadamard_factors, hadamard_matrix
from .base import (
    MAX_INDEX, Dim, IRNode, TensorRef, TensorType, in_range, is_count, node_type, require, require_tensor, same_type,
)


def _plus(dim: Dim, count: int) -> Dim:
    return dim + count if isinstance(dim, int) else f"{dim}+{count}"


@node_type
class Input(IRNode):
    """A graph input: an external tensor of this shape (symbols such as "seq" for run-time sizes) and dtype.

    Events: it arrives whole at t = 0.
    """

    inputs: ClassVar[tuple[str, ...]] = ()
    shape: tuple[Dim, ...]
    dtype: str

    def check(self):
        TensorType(self.shape, self.dtype)

    def infer(self, inputs):
        return TensorType(self.shape, self.dtype)

    @classmethod
    def example(cls):
        return cls(shape=("seq",), dtype="int64"), {}


@node_type
class Output(IRNode):
    """A graph output: the value y = Σ_t x_t of its input (e.g. the logits)."""

    @classmethod
    def example(cls):
        return cls(), {"x": TensorType(("seq", 16), "float32")}


@node_type
class Embedding(IRNode):
    """Token embedding: y = E[ids], the rows of E = weight [vocab_size, dim] picked by integer ids.

    ids [...] → y [..., dim]. Events: the rows enter at t = 0.
    """

    inputs: ClassVar[tuple[str, ...]] = ("ids",)
    weight: TensorRef

    def check(self):
        require(isinstance(self.weight, TensorRef) and len(self.weight.shape) == 2,
                f"weight must be a TensorRef of shape [vocab_size, dim], got {self.weight}")

    def infer(self, inputs):
        ids = inputs["ids"]
        require(ids.dtype in ("int32", "int64"), f"ids must be int32 or int64 token ids, got {ids}")
        return TensorType((*ids.shape, self.weight.shape[1]), self.weight.dtype)

    @classmethod
    def example(cls):
        return cls(weight=TensorRef("model.embed_tokens.weight", (16, 8))), {"ids": TensorType(("seq",), "int64")}


@node_type
class Linear(IRNode):
    """A synapse layer: y = x·Wᵀ + b, W = weight [out_features, in_features], b = bias [out_features] or none.

    x [..., in_features] → y [..., out_features].
    Events: y_t = x_t·Wᵀ, plus b at t = 0 only. With spikes x_t = σ·d(t)·s_t, x_t·Wᵀ sums the (signed, d(t)-
    scaled) columns of W that spiked: one accumulate per spike and output (fan-out out_features), and each
    output sums at most in_features inputs (fan-in).
    """

    weight: TensorRef
    bias: TensorRef | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def check(self):
        require(isinstance(self.weight, TensorRef) and len(self.weight.shape) == 2,
                f"weight must be a TensorRef of shape [out_features, in_features], got {self.weight}")
        require(self.bias is None or (isinstance(self.bias, TensorRef) and self.bias.shape == (self.out_features,)
                                      and self.bias.dtype == self.weight.dtype),
                f"bias must be None or a {self.weight.dtype} TensorRef of shape [{self.out_features}], got {self.bias}")

    def infer(self, inputs):
        x = inputs["x"]
        require(x.shape[-1:] == (self.in_features,) and x.dtype == self.weight.dtype,
                f"input x is {x}, expected [..., {self.in_features}] {self.weight.dtype} (weight {self.weight})")
        return TensorType((*x.shape[:-1], self.out_features), x.dtype)

    @classmethod
    def example(cls):
        prefix = "model.layers.0.mlp.down_proj"
        node = cls(weight=TensorRef(f"{prefix}.weight", (8, 12)), bias=TensorRef(f"{prefix}.bias", (8,)))
        return node, {"x": TensorType(("batch", "seq", 12), "float32")}


@node_type
class Rotation(IRNode):
    """An orthogonal rotation of the last dim: y = x·Q (y = x·Qᵀ with transpose) on every block of n channels
    (block-diagonal when the width is a multiple of n, e.g. one block per attention head).

    kind "hadamard": Q = H_n·diag(signs) (Q = H_n without signs), H_n = (H_{2^a}/√2^a) ⊗ H_K exactly as
    conversion.rotation.hadamard_matrix(n) builds it; `construction` is its describe_hadamard(n) and must
    still be what this spikecompile builds. signs: int8 [n] of ±1, or none.
    where "online": a backend computes it at run time (a fast Walsh–Hadamard transform and a K×K matmul);
    where "offline": foldable, not yet folded: it computes the same until passes.fold_hadamard multiplies it
    into the neighbouring synapse weights and drops the node.
    Events: y_t = x_t·Q.
    """

    kind: str = "hadamard"
    n: int
    where: str
    construction: dict
    signs: Tensor | None = None
    transpose: bool = False

    def matrix(self) -> Tensor:
        """The float64 [n, n] matrix M with y = x·M on each block: Q, or Qᵀ with transpose."""
        q, _ = hadamard_matrix(self.n)
        if self.signs is not None:
            q = q * self.signs.double()
        return q.T if self.transpose else q

    def factors(self, transposed: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(before, A, B, after), float64 [n], [2^a, 2^a], [K, K], [n], with
        matrix() = diag(before)·(A ⊗ B)·diag(after) (signs on the side the transpose puts them, ones on the other): the
        factored form the fixed-point runs and fold_hadamard apply (rotate_by_factors). transposed: the factors of
        matrix()ᵀ = diag(after)·(Aᵀ ⊗ Bᵀ)·diag(before)."""
        left, right = hadamard_factors(self.n)
        ones = torch.ones(self.n, dtype=torch.float64)
        signs = ones if self.signs is None else self.signs.double()
        if self.transpose != transposed:
            return signs, left.T.contiguous(), right.T.contiguous(), ones
        return ones, left, right, signs

    def check(self):
        require(self.kind == "hadamard", f"kind must be 'hadamard', got {self.kind!r}")
        require(is_count(self.n), f"n must be an int ≥ 1, got {self.n!r}")
        require(self.where in ("online", "offline"), f"where must be 'online' or 'offline', got {self.where!r}")
        require(isinstance(self.transpose, bool), f"transpose must be a bool, got {self.transpose!r}")
        expected = describe_hadamard(self.n)
        require(self.construction == expected, f"construction {self.construction} is not what this spikecompile "
                f"builds for n = {self.n} ({expected}); rebuild the graph")
        if self.signs is not None:
            require_tensor(self.signs, "signs", (self.n,), torch.int8)
            require(bool((self.signs.abs() == 1).all()), "signs must all be +1 or −1")

    def infer(self, inputs):
        x = inputs["x"]
        require(x.shape and is_count(x.shape[-1]) and x.shape[-1] % self.n == 0,
                f"input x is {x}, its last dim must be a multiple of n = {self.n}")
        return x

    @classmethod
    def example(cls):
        signs = torch.tensor([1, -1, -1, 1], dtype=torch.int8)
        node = cls(n=4, where="offline", construction=describe_hadamard(4), signs=signs, transpose=True)
        return node, {"x": TensorType(("seq", 8), "float32")}


def rotate_by_factors(x: Tensor, factors: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """x·M on each block of n entries of x's last dim, M given as Rotation.factors (before, A, B, after): Aᵀ·(X·B)
    on each block's (2^a, K) view X, scaled by before and after. No n×n matrix: (2^a + K)/n of the dense product's
    work. Factors in float64, so x in float64 (the fixed-point run, fold_hadamard)."""
    before, left, right, after = factors
    n = before.numel()
    blocks = (x.reshape(*x.shape[:-1], -1, n) * before).reshape(*x.shape[:-1], -1, left.shape[0], right.shape[0])
    return ((left.T @ (blocks @ right)).reshape(*x.shape[:-1], -1, n) * after).reshape(x.shape)


@node_type
class RoPE(IRNode):
    """Rotary position embedding of query or key heads (transformers' rotate-half layout).

    For the position p = position_offset + i of sequence index i and j < head_dim/2, with φ = p·inv_freq[j],
    c = attention_scaling·cos φ and s = attention_scaling·sin φ:
        y[j] = x[j]·c − x[j + head_dim/2]·s,    y[j + head_dim/2] = x[j + head_dim/2]·c + x[j]·s
    inv_freq [head_dim/2] is what transformers derived from `parameters` (its rope_parameters, e.g.
    {"rope_type": "default", "rope_theta": 10000.0}: inv_freq[j] = θ^(−2j/head_dim)), kept so every rope_type
    runs the same way. position_offset is the KV-prefix length. x [..., S, head_dim] → same.
    Events: y_t = RoPE(x_t).
    """

    head_dim: int
    inv_freq: Tensor
    parameters: dict
    attention_scaling: float = 1.0
    position_offset: int = 0

    def check(self):
        require(is_count(self.head_dim, 2) and self.head_dim % 2 == 0, f"head_dim must be even, got {self.head_dim!r}")
        require_tensor(self.inv_freq, "inv_freq", (self.head_dim // 2,))
        require(bool(torch.isfinite(self.inv_freq).all()), "inv_freq must be finite")
        require(isinstance(self.parameters, dict), f"parameters must be a dict, got {self.parameters!r}")
        # transformers' attention_factor: 1, or YaRN's / LongRoPE's 0.1·ln(s) + 1 (about 1..2): positive, small
        require(in_range(self.attention_scaling, 0, 1e3, low_open=True),
                f"attention_scaling must be a number in (0, 1e3], got {self.attention_scaling!r}")
        require(is_count(self.position_offset, 0) and self.position_offset < MAX_INDEX,
                f"position_offset must be an int in [0, 2**31), got {self.position_offset!r}")

    def infer(self, inputs):
        x = inputs["x"]
        require(len(x.shape) >= 2 and x.shape[-1] == self.head_dim and x.is_float,
                f"input x is {x}, expected float [..., S, {self.head_dim}]")
        return x

    def frequencies(self) -> Tensor:
        """[inv_freq, inv_freq] in float32 [head_dim]: position p turns channel j (and j + head_dim/2) by
        φ = p·inv_freq[j], so p·frequencies() is every channel's angle in the rotate-half layout."""
        return torch.cat((self.inv_freq, self.inv_freq)).float()

    def tables(self, length: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """(c, s) float32 [length, head_dim] for the positions p = position_offset + 0..length−1:
        c = attention_scaling·cos(p·frequencies()), s = attention_scaling·sin(p·frequencies()); angles and
        cos/sin in float32, as transformers builds them."""
        positions = torch.arange(self.position_offset, self.position_offset + length, device=device)
        angles = positions[:, None].float() * self.frequencies().to(device=device)
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling

    @classmethod
    def example(cls):
        parameters = {"rope_type": "default", "rope_theta": 10000.0}
        inv_freq = 10000.0 ** -(torch.arange(0, 4, 2, dtype=torch.float32) / 4)
        node = cls(head_dim=4, inv_freq=inv_freq, parameters=parameters, position_offset=2)
        return node, {"x": TensorType(("batch", 2, "seq", 4), "float32")}


@node_type
class SplitHeads(IRNode):
    """Split the last dim into attention heads: y[..., h, s, j] = x[..., s, h·head_dim + j].

    x [..., S, heads·head_dim] → y [..., heads, S, head_dim]. Events: per step.
    """

    heads: int
    head_dim: int

    def check(self):
        require(is_count(self.heads) and is_count(self.head_dim),
                f"heads and head_dim must be ints ≥ 1, got {self.heads!r}, {self.head_dim!r}")

    def infer(self, inputs):
        x = inputs["x"]
        require(len(x.shape) >= 2 and x.shape[-1] == self.heads * self.head_dim,
                f"input x is {x}, expected [..., S, {self.heads * self.head_dim}]")
        return TensorType((*x.shape[:-2], self.heads, x.shape[-2], self.head_dim), x.dtype)

    @classmethod
    def example(cls):
        return cls(heads=2, head_dim=4), {"x": TensorType(("seq", 8), "float32")}


@node_type
class MergeHeads(IRNode):
    """Join attention heads into the last dim (the inverse of SplitHeads): y[..., s, h·head_dim + j] =
    x[..., h, s, j].

    x [..., heads, S, head_dim] → y [..., S, heads·head_dim]. Events: per step.
    """

    heads: int
    head_dim: int

    check = SplitHeads.check

    def infer(self, inputs):
        x = inputs["x"]
        require(len(x.shape) >= 3 and x.shape[-3] == self.heads and x.shape[-1] == self.head_dim,
                f"input x is {x}, expected [..., {self.heads}, S, {self.head_dim}]")
        return TensorType((*x.shape[:-3], x.shape[-2], self.heads * self.head_dim), x.dtype)

    @classmethod
    def example(cls):
        return cls(heads=2, head_dim=4), {"x": TensorType((2, "seq", 4), "float32")}


@node_type
class KVPrefix(IRNode):
    """Prepend the prefix tokens' full-precision keys or values (PrefixQuant, docs/method.md §6):
    y = concat(cache, x) along the sequence dim.

    x [..., kv_heads, S, head_dim], cache [kv_heads, P, head_dim] (P = len(token_ids)) → y [..., kv_heads,
    P + S, head_dim]. The cache is the float model's post-RoPE keys (or values) of token_ids, computed once
    with every site off and held in the tensor store. Events: the cache enters at t = 0, x_t per step.
    """

    which: str
    token_ids: tuple[int, ...]
    cache: TensorRef

    def check(self):
        require(self.which in ("key", "value"), f"which must be 'key' or 'value', got {self.which!r}")
        require(isinstance(self.token_ids, tuple) and self.token_ids
                and all(is_count(t, 0) and t < MAX_INDEX for t in self.token_ids),
                f"token_ids must be a non-empty tuple of token ids, got {self.token_ids!r}")
        require(isinstance(self.cache, TensorRef) and len(self.cache.shape) == 3
                and self.cache.shape[1] == len(self.token_ids),
                f"cache must be a TensorRef of shape [kv_heads, {len(self.token_ids)}, head_dim], got {self.cache}")

    def infer(self, inputs):
        x = inputs["x"]
        heads, length, head_dim = self.cache.shape
        require(len(x.shape) >= 3 and (x.shape[-3], x.shape[-1]) == (heads, head_dim) and x.dtype == self.cache.dtype,
                f"input x is {x}, expected [..., {heads}, S, {head_dim}] {self.cache.dtype} like the cache")
        return TensorType((*x.shape[:-2], _plus(x.shape[-2], length), head_dim), x.dtype)

    @classmethod
    def example(cls):
        cache = TensorRef("prefix.layers.0.key", (1, 2, 4))
        return cls(which="key", token_ids=(1, 13), cache=cache), {"x": TensorType((1, "seq", 4), "float32")}


@node_type
class ResidualAdd(IRNode):
    """The residual connection: y = residual + branch (same type). Events: y_t = residual_t + branch_t."""

    inputs: ClassVar[tuple[str, ...]] = ("residual", "branch")

    def infer(self, inputs):
        return same_type(inputs)

    @classmethod
    def example(cls):
        hidden = TensorType(("seq", 8), "float32")
        return cls(), {"residual": hidden, "branch": hidden}
