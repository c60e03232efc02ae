"""Nonlinear nodes: their event forms keep running sums X_t (docs/method.md §3) and are exact — the outputs of all
steps sum to the decoded output of the summed inputs — and causal: step t reads steps ≤ t only.
"""

from __future__ import annotations

from typing import ClassVar

from .base import IRNode, TensorRef, TensorType, in_range, is_count, node_type, require, same_type


@node_type
class Nonlinear(IRNode):
    """A nonlinearity f over the last dim of x (output shaped like x):

        rmsnorm  f(x) = x / √(mean(x²) + eps) · γ      γ = weight [dim], or none once folded into the next linears
        softmax  f(x) = exp(x − max x) / Σ exp(x − max x)   with, when causal, the entries of key j > i + S_k − S_q
                 masked to −∞ for query i (x [..., S_q, S_k]; the keys may start with a prefix)
        silu     f(x) = x · sigmoid(x)

    Events: out_t = f(X_t) − f(X_{t−1}) with f(X_{−1}) := 0, so Σ_t out_t = f(Σ_t x_t).
    """

    FUNCTIONS: ClassVar[tuple[str, ...]] = ("rmsnorm", "softmax", "silu")
    function: str
    eps: float | None = None
    weight: TensorRef | None = None
    causal: bool = False

    def check(self):
        require(self.function in self.FUNCTIONS, f"function must be one of {self.FUNCTIONS}, got {self.function!r}")
        is_norm = self.function == "rmsnorm"
        # eps guards a division by √(mean(x²) + eps): models use 1e-5 or 1e-6; above 1 it would be the norm itself
        require(in_range(self.eps, 0, 1, low_open=True) if is_norm else self.eps is None,
                f"eps must be a number in (0, 1] for rmsnorm and None otherwise, got {self.eps!r}")
        require(self.weight is None or (is_norm and isinstance(self.weight, TensorRef) and len(self.weight.shape) == 1),
                f"weight must be None, or for rmsnorm a TensorRef of shape [dim], got {self.weight}")
        require(isinstance(self.causal, bool) and (not self.causal or self.function == "softmax"),
                f"causal must be a bool, True only for softmax, got {self.causal!r}")

    def infer(self, inputs):
        x = inputs["x"]
        require(x.shape and x.is_float, f"input x is {x}, expected a float tensor")
        require(self.weight is None or x.shape[-1:] == self.weight.shape,
                f"input x is {x}, its last dim must match the norm weight {self.weight}")
        require(not self.causal or len(x.shape) >= 2, f"input x is {x}, a causal softmax needs [..., S_q, S_k]")
        return x

    @classmethod
    def example(cls):
        node = cls(function="rmsnorm", eps=1e-5, weight=TensorRef("model.layers.0.input_layernorm.weight", (8,)))
        return node, {"x": TensorType(("seq", 8), "float32")}


@node_type
class ActivationMatmul(IRNode):
    """A product of two activations (both spike trains in the reference placement), b's heads shared by
    `groups` consecutive heads of a (grouped-query attention: head h of a meets head h // groups of b):

        qk  out = scaling · a·bᵀ    a [..., H, S_q, D],   b [..., H/groups, S_k, D] → [..., H, S_q, S_k]
        pv  out = scaling · a·b     a [..., H, S_q, S_k], b [..., H/groups, S_k, D] → [..., H, S_q, D]

    Events: out_t = scaling·(A_t·b_t + a_t·B_t − a_t·b_t) (b transposed for qk; A_t, B_t the running sums), so
    Σ_t out_t = scaling·A·B; computed as scaling·(A_t·B_t − A_{t−1}·B_{t−1}), the same in one product per step.
    """

    inputs: ClassVar[tuple[str, ...]] = ("a", "b")
    which: str
    scaling: float = 1.0
    groups: int = 1

    @property
    def transpose_b(self) -> bool:
        return self.which == "qk"

    def check(self):
        require(self.which in ("qk", "pv"), f"which must be 'qk' or 'pv', got {self.which!r}")
        # qk: 1/√head_dim (or a model's query scale), pv: 1; none is negative, none near 1e3
        require(in_range(self.scaling, 0, 1e3, low_open=True), f"scaling must be a number in (0, 1e3], "
                                                                f"got {self.scaling!r}")
        require(is_count(self.groups), f"groups must be an int ≥ 1, got {self.groups!r}")

    def infer(self, inputs):
        a, b = inputs["a"], inputs["b"]
        require(len(a.shape) >= 3 and len(b.shape) == len(a.shape) and a.shape[:-3] == b.shape[:-3]
                and a.shape[-3] == self.groups * b.shape[-3] and a.dtype == b.dtype and a.is_float,
                f"operands a {a} and b {b} must be float [..., H, S, ·] and [..., H/{self.groups}, S, ·]")
        inner, b_rows, b_cols = a.shape[-1], b.shape[-2], b.shape[-1]
        require(inner == (b_cols if self.transpose_b else b_rows),
                f"operands a {a} and b {b} do not chain for {self.which}")
        return TensorType((*a.shape[:-1], b_rows if self.transpose_b else b_cols), a.dtype)

    @classmethod
    def example(cls):
        node = cls(which="qk", scaling=0.5, groups=2)
        return node, {"a": TensorType((4, "seq", 4), "float32"), "b": TensorType((2, "seq+2", 4), "float32")}


@node_type
class ElementwiseProduct(IRNode):
    """The MLP product out = a ⊙ b (same type; spikes(SiLU(gate)) ⊙ up in the reference placement).

    Events: out_t = A_t⊙b_t + a_t⊙B_t − a_t⊙b_t (the causal running-sum form; exact, unlike the paper's
    symmetric form it needs no future step), so Σ_t out_t = A⊙B; computed as A_t⊙B_t − A_{t−1}⊙B_{t−1}.
    """

    inputs: ClassVar[tuple[str, ...]] = ("a", "b")

    def infer(self, inputs):
        return same_type(inputs)

    @classmethod
    def example(cls):
        hidden = TensorType(("seq", 12), "float32")
        return cls(), {"a": hidden, "b": hidden}
