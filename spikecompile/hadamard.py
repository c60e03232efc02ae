"""Hadamard matrices and the fast Hadamard transform (no model knowledge: conversion rotates models with them,
the IR's Rotation nodes and every backend apply them).

Hadamard matrices of width n = 2^a·K are H_n = H_{2^a} ⊗ H_K / sqrt(n), with H_{2^a} Sylvester's and H_K
from a Paley construction over a prime or prime-power field (a fixed random orthogonal block where none exists),
so that x·H_n costs one fast Walsh–Hadamard transform plus a K×K matmul (or, for float64 weights, one small
GEMM per Sylvester factor: apply_hadamard_gemm). On CUDA the transform is fast-hadamard-transform's kernel when that
package imports, the pure-torch butterfly otherwise.
"""

import functools
import math

import torch

from .errors import SpikecompileError

# Seed of the random orthogonal K×K block used when no Paley construction exists for K. It is fixed
# (not the rotation seed) so that hadamard_matrix(n) and apply_hadamard(x, n) always mean the same matrix.
FALLBACK_BLOCK_SEED = 0


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, m) with q = p^m, p prime and m ≥ 2; None for a prime or anything else."""
    for p in range(2, math.isqrt(q) + 1):
        if q % p == 0:
            m, rest = 0, q
            while rest % p == 0:
                rest, m = rest // p, m + 1
            return (p, m) if rest == 1 and _is_prime(p) else None
    return None


def _poly_mod(dividend: list[int], divisor: list[int], p: int) -> list[int]:
    """dividend mod a monic divisor over GF(p); coefficients lowest degree first."""
    rest = list(dividend)
    degree = len(divisor) - 1
    for top in range(len(rest) - 1, degree - 1, -1):
        factor = rest[top] % p
        if factor:
            for index, coefficient in enumerate(divisor):
                rest[top - degree + index] = (rest[top - degree + index] - factor * coefficient) % p
    return [c % p for c in rest[:degree]]


def _monic(p: int, degree: int):
    """Every monic polynomial of `degree` over GF(p), lowest coefficients first, in counting order."""
    for number in range(p ** degree):
        yield [(number // p ** index) % p for index in range(degree)] + [1]


@functools.lru_cache(maxsize=None)
def _irreducible(p: int, m: int) -> tuple[int, ...]:
    """The first monic irreducible polynomial of degree m over GF(p) in counting order (no monic factor of degree
    1..m/2), lowest coefficient first: GF(p^m) = GF(p)[x]/(f), a fixed choice so that H_n is always one matrix."""
    for candidate in _monic(p, m):
        if all(any(_poly_mod(candidate, factor, p)) for degree in range(1, m // 2 + 1)
               for factor in _monic(p, degree)):
            return tuple(candidate)
    raise AssertionError(f"no irreducible polynomial of degree {m} over GF({p})")  # one always exists


def _field_squares(p: int, m: int) -> set[int]:
    """The nonzero squares of GF(p^m), each element the integer Σ c_i·p^i of its coefficients mod f."""
    modulus = list(_irreducible(p, m))
    squares = set()
    for number in range(1, p ** m):
        digits = [(number // p ** index) % p for index in range(m)]
        product = [0] * (2 * m - 1)
        for i, a in enumerate(digits):
            for j, b in enumerate(digits):
                product[i + j] += a * b
        squares.add(sum(c * p ** index for index, c in enumerate(_poly_mod(product, modulus, p))))
    return squares


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(a_j − a_i), χ the quadratic character of GF(q) (0 at 0, +1 on squares, −1 else). For a prime q,
    a_i = i mod q; for a prime power q = p^m, a_i is the polynomial whose coefficients are i's base-p digits, in
    GF(p)[x]/(f) with f = _irreducible(p, m)."""
    power = _prime_power(q)
    if power is None:
        squares = {(x * x) % q for x in range(1, q)}
        chi = [0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)]
        idx = torch.arange(q)
        return torch.tensor(chi, dtype=torch.float64)[(idx[None, :] - idx[:, None]) % q]
    p, m = power
    squares = _field_squares(p, m)
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    weights = p ** torch.arange(m)
    digits = (torch.arange(q)[:, None] // weights) % p  # [q, m]
    difference = (digits[None, :, :] - digits[:, None, :]) % p  # a_j − a_i, digit by digit
    return chi[(difference * weights).sum(-1)]


def _paley1(q: int) -> torch.Tensor:
    """Paley I, order q+1 for a prime power q ≡ 3 (mod 4): H = I + S, S = [[0, 1ᵀ], [−1, Q]] (S skew)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Paley II, order 2(q+1) for a prime power q ≡ 1 (mod 4): with C = [[0, 1ᵀ], [1, Q]] (C symmetric),
    H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _paley_block(k: int) -> tuple[torch.Tensor, str] | None:
    """An unnormalised ±1 Hadamard matrix of order k, or None when no Paley construction gives k. Over a prime
    field first (the constructions every earlier version used, so those widths keep their matrices), then over
    GF(p^m): LLaMA-2-7B's 11008 = 32·344 needs GF(7³), where a prime field only gives 2·5504."""
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64), "trivial"
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return _paley1(k - 1), f"paley1(q={k - 1})"
    if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return _paley2(k // 2 - 1), f"paley2(q={k // 2 - 1})"
    for q, build, name, residue in ((k - 1, _paley1, "paley1", 3), (k // 2 - 1, _paley2, "paley2", 1)):
        power = _prime_power(q) if q > 1 and (name == "paley1" or k % 2 == 0) else None
        if power is not None and q % 4 == residue:
            p, m = power
            terms = [(index, c) for index, c in enumerate(_irreducible(p, m)) if c][::-1]
            polynomial = " + ".join((f"{c}" if c > 1 or not index else "") + ("x" if index else "") +
                                    (f"^{index}" if index > 1 else "") for index, c in terms)
            return build(q), f"{name}(q={q}={p}^{m}, GF({p})[x]/({polynomial}))"
    return None


def _random_orthogonal(k: int) -> torch.Tensor:
    """Q from the QR decomposition of a seeded Gaussian, columns sign-fixed by sign(diag(R))."""
    gaussian = torch.randn(k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(FALLBACK_BLOCK_SEED))
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).contiguous()


@functools.lru_cache(maxsize=None)
def _factor(n: int) -> tuple[int, torch.Tensor, tuple[tuple[str, object], ...]]:
    """(2^a, orthonormal K×K block, description) with n = 2^a·K and 2^a as large as a Paley K allows.

    When no split n = 2^a·K has a Paley K, K is the odd part of n and the block is a random orthogonal
    matrix: H_n is then orthonormal but not a Hadamard matrix (its entries are not all ±1/sqrt(n)).
    """
    if n < 1:
        raise SpikecompileError(f"Hadamard width must be a positive integer, got {n}")
    pow2 = n & -n
    while pow2 >= 1:
        found = _paley_block(n // pow2)
        if found is not None:
            block, construction = found
            return pow2, block / math.sqrt(n // pow2), (("n", n), ("pow2", pow2), ("k", n // pow2),
                                                        ("k_construction", construction))
        pow2 //= 2
    k = n // (n & -n)
    construction = f"random_orthogonal(seed={FALLBACK_BLOCK_SEED}): no split {n} = 2^a·K has a Paley K"
    return n // k, _random_orthogonal(k), (("n", n), ("pow2", n // k), ("k", k), ("k_construction", construction))


def _sylvester(m: int) -> torch.Tensor:
    """Unnormalised Sylvester Hadamard matrix: H_1 = [1], H_2m = [[H_m, H_m], [H_m, −H_m]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def describe_hadamard(n: int) -> dict:
    """JSON-serialisable description of H_n, e.g. {"n": 576, "pow2": 16, "k": 36, "k_construction": "paley2(q=17)"}."""
    return dict(_factor(n)[2])


def hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_{2^a} / sqrt(2^a), H_K): the float64 Kronecker factors of H_n = hadamard_matrix(n), so that x·H_n costs
    2^a + K multiply-adds per channel instead of n."""
    pow2, block, _ = _factor(n)
    return _sylvester(pow2) / math.sqrt(pow2), block


def hadamard_matrix(n: int) -> tuple[torch.Tensor, dict]:
    """Dense orthonormal H_n = (H_{2^a} / sqrt(2^a)) ⊗ H_K (float64, n×n) and its description."""
    return torch.kron(*hadamard_factors(n)), describe_hadamard(n)


_CUDA_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _cuda_hadamard_transform():
    try:
        from fast_hadamard_transform import hadamard_transform
    except ImportError:
        return None
    return hadamard_transform


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """x·H_m along dim −2 (m = x.shape[−2], a power of two), unnormalised, one butterfly stage per bit.

    Without autograd each stage writes its sums and differences straight into the halves of one of two reused
    buffers (the same additions, so the same bits, as stacking them, at a fraction of the memory traffic)."""
    *lead, m, k = x.shape
    if m == 1:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        h = 1
        while h < m:
            pairs = x.reshape(*lead, m // (2 * h), 2, h, k)
            x = torch.stack((pairs[..., 0, :, :] + pairs[..., 1, :, :], pairs[..., 0, :, :] - pairs[..., 1, :, :]),
                            -3)
            h *= 2
        return x.reshape(*lead, m, k)
    buffers = [torch.empty(*lead, m, k, dtype=x.dtype, device=x.device) for _ in range(2)]
    source, h, stage = x, 1, 0
    while h < m:
        pairs = source.reshape(*lead, m // (2 * h), 2, h, k)
        target = buffers[stage % 2].view(*lead, m // (2 * h), 2, h, k)
        torch.add(pairs[..., 0, :, :], pairs[..., 1, :, :], out=target[..., 0, :, :])
        torch.sub(pairs[..., 0, :, :], pairs[..., 1, :, :], out=target[..., 1, :, :])
        source, h, stage = buffers[stage % 2], h * 2, stage + 1
    return source


GEMM_FACTOR = 64
"""apply_hadamard_gemm splits H_{2^a} into Sylvester factors of at most this width."""


@functools.lru_cache(maxsize=None)
def _sylvester_factors(pow2: int) -> tuple[torch.Tensor, ...]:
    """Unnormalised Sylvester matrices of widths 2^b ≤ GEMM_FACTOR (as even as possible) whose Kronecker product is
    the unnormalised H_pow2 (none for pow2 = 1)."""
    bits = pow2.bit_length() - 1
    parts = max(1, -(-bits // (GEMM_FACTOR.bit_length() - 1)))
    widths = [1 << (bits // parts + (index < bits % parts)) for index in range(parts)]
    return tuple(_sylvester(width) for width in widths if width > 1)


@functools.lru_cache(maxsize=None)
def _gemm_factors(n: int) -> tuple[torch.Tensor, ...]:
    """The float64 matrices whose Kronecker product is √(2^a)·H_n: _sylvester_factors(2^a), then the orthonormal
    K×K block (none when K = 1)."""
    pow2, block, _ = _factor(n)
    factors = _sylvester_factors(pow2)
    return (*factors, block) if block.shape[0] > 1 else factors


def sylvester_rows(x: torch.Tensor) -> torch.Tensor:
    """x·(H_m/√m) along the last dim (m = x.shape[−1], a power of two; Sylvester's H_m is symmetric, so this is
    also (H_m/√m)ᵀ applied to x's rows) as one batched GEMM per Sylvester factor of at most GEMM_FACTOR:
    (Σ widths) multiply-adds per element instead of m."""
    width = x.shape[-1]
    if width & (width - 1):
        raise SpikecompileError(f"sylvester_rows: the last dim {width} is not a power of two")
    return _by_factors(x, _sylvester_factors(width), width)


def _by_factors(x: torch.Tensor, factors: tuple[torch.Tensor, ...], pow2: int) -> torch.Tensor:
    """x·(F_1 ⊗ F_2 ⊗ …)/√pow2 along the last dim (x itself, divided, when there are no factors)."""
    factors = tuple(factor.to(device=x.device, dtype=x.dtype) for factor in factors)
    rows = x.reshape(-1, x.shape[-1])
    rows = _kron_rows(rows, factors) if factors else rows.clone()
    return rows.div_(math.sqrt(pow2)).reshape(x.shape)


def _kron_rows(rows: torch.Tensor, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """rows·(F_1 ⊗ F_2 ⊗ …) for rows [r, m]: with the rows viewed as [r, s, m/s] (s = F_1's width),
    X·(F_1 ⊗ R) = F_1ᵀ·(X·R), one batched matrix product per factor."""
    first, rest = factors[0], factors[1:]
    if not rest:
        return rows @ first
    count, width = rows.shape
    size = first.shape[0]
    inner = _kron_rows(rows.reshape(count * size, width // size), rest).reshape(count, size, width // size)
    return torch.matmul(first.T, inner).reshape(count, width)


def apply_hadamard_gemm(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """x·H_n along the last dim as small dense matrix products: H_{2^a} split into Sylvester factors of at most
    GEMM_FACTOR columns (4096 = 64·64; 11008 = 32 and its 344 block), one batched GEMM each, then the
    normalisation 1/√(2^a) once. (Σ factor widths) multiply-adds per element against the butterfly's log2(2^a)
    passes over memory with short strides: for an 11008 × 4096 float64 weight about 3× faster on a busy 2-core
    CPU (on a quiet one a 7B-shaped conversion took the same time either way: bench/results/scale.json). Used for
    the conversion's weight rotations. Equal to apply_hadamard up to float rounding, not bit for bit, so the
    forward passes (OnlineHadamard, the IR's Rotation nodes, the backends) keep apply_hadamard."""
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise SpikecompileError(f"apply_hadamard_gemm: last dim of the input is {x.shape[-1]}, expected {n}")
    return _by_factors(x, _gemm_factors(n), _factor(n)[0])


def apply_hadamard(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """x·H_n along the last dim, without forming H_n.

    Viewing the last dim as (2^a, K), x·(A ⊗ B) = Aᵀ·X·B with X the (2^a, K) view; A = Sylvester is symmetric,
    so this is an FWHT over the 2^a axis (fast_hadamard_transform's CUDA kernel when x is a CUDA fp32/fp16/bf16
    tensor and the package imports, a pure-torch butterfly otherwise) followed by a K×K matmul.
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise SpikecompileError(f"apply_hadamard: last dim of the input is {x.shape[-1]}, expected {n}")
    pow2, block, _ = _factor(n)
    grid = x.reshape(*x.shape[:-1], pow2, n // pow2)
    cuda_transform = _cuda_hadamard_transform() if x.is_cuda and x.dtype in _CUDA_KERNEL_DTYPES else None
    if cuda_transform is not None:
        grid = cuda_transform(grid.transpose(-1, -2).contiguous(), 1.0 / math.sqrt(pow2)).transpose(-1, -2)
    else:
        transformed = _fwht(grid)
        # the transform's own buffer is divided in place (the same division, one full-size temporary fewer)
        grid = transformed / math.sqrt(pow2) if transformed is grid or transformed.requires_grad \
            else transformed.div_(math.sqrt(pow2))
    return (grid @ block.to(device=x.device, dtype=x.dtype)).reshape(x.shape)
