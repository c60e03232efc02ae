"""QuaRot-style Hadamard rotation of a LLaMA model (method.md §6): computational invariance.

Row-vector convention throughout (a linear computes y = x·Wᵀ + b). For an orthogonal R (R·Rᵀ = I):

* RMSNorm with γ = 1 commutes with R: x·R / rms(x·R) = (x / rms(x))·R, since rms is invariant under R.
* A linear reading a rotated input x·R keeps its output if W ← W·R.
* A linear whose output y should become y·R gets W ← Rᵀ·W, b ← Rᵀ·b.

Hadamard matrices of width n = 2^a·K are H_n = H_{2^a} ⊗ H_K / sqrt(n), with H_{2^a} Sylvester's and H_K
from a Paley construction, so that x·H_n costs one fast Walsh–Hadamard transform plus a K×K matmul.
"""

import functools
import math

import torch

from spikecompile.errors import SpikecompileError

# Seed of the random orthogonal K×K block used when no Paley construction exists for K. It is fixed
# (not the rotation seed) so that hadamard_matrix(n) and apply_hadamard(x, n) always mean the same matrix.
FALLBACK_BLOCK_SEED = 0


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), χ the quadratic character mod the prime q (0 at 0, +1 on squares, −1 else)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)]
    idx = torch.arange(q)
    return torch.tensor(chi, dtype=torch.float64)[(idx[None, :] - idx[:, None]) % q]


def _paley1(q: int) -> torch.Tensor:
    """Paley I, order q+1 for a prime q ≡ 3 (mod 4): H = I + S, S = [[0, 1ᵀ], [−1, Q]] (S skew)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Paley II, order 2(q+1) for a prime q ≡ 1 (mod 4): with C = [[0, 1ᵀ], [1, Q]] (C symmetric),
    H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _paley_block(k: int) -> tuple[torch.Tensor, str] | None:
    """An unnormalised ±1 Hadamard matrix of order k, or None when neither Paley construction gives k."""
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64), "trivial"
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return _paley1(k - 1), f"paley1(q={k - 1})"
    if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return _paley2(k // 2 - 1), f"paley2(q={k // 2 - 1})"
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


def hadamard_matrix(n: int) -> tuple[torch.Tensor, dict]:
    """Dense orthonormal H_n = (H_{2^a} / sqrt(2^a)) ⊗ H_K (float64, n×n) and its description."""
    pow2, block, _ = _factor(n)
    return torch.kron(_sylvester(pow2) / math.sqrt(pow2), block), describe_hadamard(n)


_CUDA_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _cuda_hadamard_transform():
    try:
        from fast_hadamard_transform import hadamard_transform
    except ImportError:
        return None
    return hadamard_transform


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """x·H_m along dim −2 (m = x.shape[−2], a power of two), unnormalised, one butterfly stage per bit."""
    *lead, m, k = x.shape
    h = 1
    while h < m:
        pairs = x.reshape(*lead, m // (2 * h), 2, h, k)
        x = torch.stack((pairs[..., 0, :, :] + pairs[..., 1, :, :], pairs[..., 0, :, :] - pairs[..., 1, :, :]), -3)
        h *= 2
    return x.reshape(*lead, m, k)


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
        grid = _fwht(grid) / math.sqrt(pow2)
    return (grid @ block.to(device=x.device, dtype=x.dtype)).reshape(x.shape)


class OnlineHadamard:
    """Forward pre-hook x ← x·H_n on a module's first input (a plain class so models with it can be pickled)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, module, args):
        return (apply_hadamard(args[0], self.n), *args[1:])


def _get(obj, path: str):
    for part in path.split("."):
        if not hasattr(obj, part):
            raise SpikecompileError(
                f"rotate_llama: model has no '{path}' (needs a LLaMA/Mistral-style causal LM with "
                "model.model.layers[i].self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj)")
        obj = getattr(obj, part)
    return obj


def _check_rmsnorm(norm: torch.nn.Module, name: str) -> None:
    """Refuse norms that are not y = x / rms(x) · γ (LayerNorm, Gemma's (1 + γ), norms with a bias)."""
    weight = getattr(norm, "weight", None)
    if weight is None or weight.dim() != 1 or getattr(norm, "bias", None) is not None:
        raise SpikecompileError(f"rotate_llama: {name} is not an RMSNorm with a weight vector and no bias")
    probe = (torch.randn(2, weight.numel(), generator=torch.Generator().manual_seed(0)) + 1.0).to(weight.device)
    expected = probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True)) * weight.detach().float()
    with torch.no_grad():
        got = norm(probe.to(weight.dtype)).float()
    if not torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()):
        raise SpikecompileError(f"rotate_llama: {name} does not compute x / rms(x) · γ, so γ cannot be folded")


@torch.no_grad()
def _rewrite(linear: torch.nn.Linear, left: torch.Tensor | None = None, right: torch.Tensor | None = None,
             scale: torch.Tensor | None = None) -> None:
    """W ← left·W·right (or W·diag(scale)) and b ← left·b, in float64, cast back to the weight's dtype once."""
    weight = linear.weight.double()
    if scale is not None:
        weight = weight * scale
    if left is not None:
        weight = left @ weight
        if linear.bias is not None:
            linear.bias.copy_(left @ linear.bias.double())
    if right is not None:
        weight = weight @ right
    linear.weight.copy_(weight)


def _untie_lm_head(model) -> bool:
    """Give lm_head its own Parameter and stop transformers from re-tying it (config and tie mapping)."""
    lm_head, embed = _get(model, "lm_head"), _get(model, "model.embed_tokens")
    if lm_head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    lm_head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    getattr(model, "all_tied_weights_keys", {}).pop("lm_head.weight", None)
    return True


def _per_head(matrix: torch.Tensor, width: int) -> torch.Tensor:
    """blockdiag(matrix, …, matrix) of size width."""
    return torch.block_diag(*[matrix] * (width // matrix.shape[0]))


@torch.no_grad()
def rotate_llama(model, seed: int, apply: bool = True) -> dict:
    """Fold RMSNorm weights and Hadamard-rotate a LLaMA/Mistral-style causal LM in place; logits are unchanged.

    With Q = H_d·diag(s) (d = hidden size, s ∈ {±1}^d from torch.Generator().manual_seed(seed)), H_h the
    head-dim Hadamard and H_i the intermediate-size Hadamard (all orthonormal, see hadamard_matrix):

    * embed_tokens: E ← E·Q                                (residual stream h becomes h·Q)
    * q/k_proj:  W ← W·diag(γ_in)·Q                        (γ_in ← 1)
    * v_proj:    W ← blockdiag(H_hᵀ)·W·diag(γ_in)·Q,  b ← blockdiag(H_hᵀ)·b   (each KV head's v becomes v·H_h)
    * o_proj:    W ← Qᵀ·W·blockdiag(H_h),  b ← Qᵀ·b        (per attention head; GQA heads share their KV head's H_h)
    * gate/up_proj: W ← W·diag(γ_post)·Q                   (γ_post ← 1)
    * down_proj: W ← Qᵀ·W·H_i,  b ← Qᵀ·b, plus an ONLINE pre-hook x ← x·H_i (OnlineHadamard, no signs)
    * lm_head:   W ← W·diag(γ_final)·Q                     (γ_final ← 1; untied from embed_tokens first)

    q/k biases and gate/up biases are unchanged (only their inputs rotate). Dense products are done in float64,
    so the same model and seed give bitwise identical weights. Forward pre-hooks run in registration order:
    a pre-hook registered on mlp.down_proj after this call (e.g. a spike site) sees the rotated input x·H_i.
    The online hooks are not part of the state dict: save_pretrained/from_pretrained drop them, so a reloaded
    model must get them back from the returned record ("online").

    Returns a JSON-serialisable record of every rotation: which were folded offline into which weights
    ("residual", "head", "folded_norms") and which run online ("online").

    With apply=False only the norms are folded (W ← W·diag(γ), γ ← 1, lm_head untied) and the online hooks
    registered; the offline rotations are left for the compiler (frontend.trace makes them Rotation nodes,
    passes.fold_hadamard folds them), so the model's own forward is NOT the rotated model's. Same record.
    """
    layers = _get(model, "model.layers")
    names = {module: name for name, module in model.named_modules()}
    if any(isinstance(hook, OnlineHadamard) for layer in layers for hook in
           _get(layer, "mlp.down_proj")._forward_pre_hooks.values()):
        raise SpikecompileError("rotate_llama: model is already rotated (down_proj has an online Hadamard hook)")
    norms = [_get(layer, n) for layer in layers for n in ("input_layernorm", "post_attention_layernorm")]
    for norm in [*norms, _get(model, "model.norm")]:
        _check_rmsnorm(norm, names[norm])
    untied = _untie_lm_head(model)

    hidden = _get(model, "model.embed_tokens").weight.shape[1]
    h_resid, resid_desc = hadamard_matrix(hidden)
    signs = torch.randint(0, 2, (hidden,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    q = h_resid * signs.double()
    head_dim = _get(layers[0], "self_attn").head_dim
    h_head, head_desc = hadamard_matrix(head_dim)
    record = {
        "method": "hadamard", "seed": seed,
        "residual": {**resid_desc, "definition": "Q = H_n · diag(signs)", "signs": signs.tolist(),
                     "weight_right_Q": [], "weight_left_QT": []},
        "head": {**head_desc, "definition": "per head: v rows ← H_hᵀ·W, o columns ← W·H_h",
                 "v_out": [], "o_in": []},
        "online": [], "folded_norms": [], "untied_lm_head": untied,
    }

    def read_residual(norm, linears, left=None):
        """Fold γ and Q into the linears reading this norm's output; left maps a linear to its output rotation."""
        gamma = norm.weight.double()
        for linear in linears:
            if apply:
                _rewrite(linear, left=(left or {}).get(linear), right=gamma[:, None] * q)
            else:
                _rewrite(linear, scale=gamma)
        record["residual"]["weight_right_Q"] += [names[m] for m in linears]
        record["folded_norms"].append({"norm": names[norm], "into": [names[m] for m in linears]})
        norm.weight.fill_(1.0)

    embed = model.model.embed_tokens
    if apply:
        embed.weight.copy_(embed.weight.double() @ q)
    record["residual"]["weight_right_Q"].append(names[embed])
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        read_residual(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj],
                      left={attn.v_proj: _per_head(h_head.T, attn.v_proj.out_features)})
        if apply:
            _rewrite(attn.o_proj, left=q.T, right=_per_head(h_head, attn.o_proj.in_features))
        read_residual(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        h_inter, inter_desc = hadamard_matrix(mlp.down_proj.in_features)
        if apply:
            _rewrite(mlp.down_proj, left=q.T, right=h_inter)
        mlp.down_proj.register_forward_pre_hook(OnlineHadamard(mlp.down_proj.in_features))
        record["residual"]["weight_left_QT"] += [names[attn.o_proj], names[mlp.down_proj]]
        record["head"]["v_out"].append(names[attn.v_proj])
        record["head"]["o_in"].append(names[attn.o_proj])
        record["online"].append({"module": names[mlp.down_proj], "where": "input", **inter_desc,
                                 "folded": "weight ← weight · H_n", "hook": "OnlineHadamard"})
    read_residual(model.model.norm, [model.lm_head])
    return record
