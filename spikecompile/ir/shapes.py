"""Symbolic shapes bound to sizes: a TensorType's dims are ints or symbols ("batch", "seq", "seq+2" for a
window behind a KV prefix of 2 tokens), and a summary, a mapping or a simulation binds them to one window,
e.g. {"batch": 1, "seq": 512}."""

from __future__ import annotations

import math

from .base import Dim


def bind(dim: Dim, bindings: dict[str, int]) -> int | None:
    """A dim's size with its symbol bound: 7 → 7, "seq" → bindings["seq"], "seq+2" → bindings["seq"] + 2;
    None for a symbol not in `bindings`."""
    if isinstance(dim, int):
        return dim
    symbol, *offsets = dim.split("+")
    if symbol not in bindings or not all(offset.isdigit() for offset in offsets):
        return None
    return bindings[symbol] + sum(int(offset) for offset in offsets)


def per_token(shape: tuple[Dim, ...], bindings: dict[str, int]) -> int | None:
    """Elements of a tensor of this shape per token of the window (its count / bindings["seq"]); None when
    the shape has no sequence dim or a symbol that `bindings` lacks."""
    sizes = [bind(dim, bindings) for dim in shape]
    if None in sizes or sequence_dims(shape) == 0:
        return None
    return math.prod(sizes) // bindings["seq"]


def sequence_dims(shape: tuple[Dim, ...]) -> int:
    """How many dims grow with the sequence ("seq", "seq+P"): 2 for attention probabilities [.., S, S+P]."""
    return sum(isinstance(dim, str) and dim.split("+")[0] == "seq" for dim in shape)
