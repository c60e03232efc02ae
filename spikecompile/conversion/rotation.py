"""QuaRot-style Hadamard rotation of a LLaMA model (docs/method.md §6): computational invariance.

Row-vector convention throughout (a linear computes y = x·Wᵀ + b). For an orthogonal R (R·Rᵀ = I):

* RMSNorm with γ = 1 commutes with R: x·R / rms(x·R) = (x / rms(x))·R, since rms is invariant under R.
* A linear reading a rotated input x·R keeps its output if W ← W·R.
* A linear whose output y should become y·R gets W ← Rᵀ·W, b ← Rᵀ·b.

The Hadamard matrices and their fast transform live in spikecompile.hadamard.
"""

import torch

from spikecompile.errors import SpikecompileError
from spikecompile.hadamard import apply_hadamard, apply_hadamard_gemm, describe_hadamard, hadamard_matrix


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
    if weight.is_meta:  # a weightless model (conversion.layered): each real part is checked when it is built
        return
    probe = (torch.randn(2, weight.numel(), generator=torch.Generator().manual_seed(0)) + 1.0).to(weight.device)
    expected = probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True)) * weight.detach().float()
    with torch.no_grad():
        got = norm(probe.to(weight.dtype)).float()
    if not torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()):
        raise SpikecompileError(f"rotate_llama: {name} does not compute x / rms(x) · γ, so γ cannot be folded")


CHUNK_BYTES = 64 << 20
"""A right-only rewrite (W·R acts on each row alone) runs on blocks of rows of at most this many float64 bytes, so
that a 128256 × 4096 embedding or lm_head (4.2 GB in float64) never exists whole in float64."""


@torch.no_grad()
def _rewrite(linear: torch.nn.Linear, left=None, right=None, scale: torch.Tensor | None = None) -> None:
    """W ← left(W), then right(W) (or W·diag(scale)), and b ← left(b), in float64, cast back to the weight's dtype
    once. left(X) computes L·X and right(X) computes X·R for float64 X, each as its factors (ResidualRotation)."""
    if left is None:
        def transform(rows: torch.Tensor) -> torch.Tensor:
            rows = rows if scale is None else rows * scale
            return rows if right is None else right(rows)
        _rows_times(linear.weight, transform)
        return
    weight = linear.weight.double()
    if scale is not None:
        weight = weight * scale
    weight = left(weight)
    if linear.bias is not None:
        linear.bias.copy_(left(linear.bias.double()[:, None])[:, 0])
    if right is not None:
        weight = right(weight)
    linear.weight.copy_(weight)


def _rows_times(weight: torch.Tensor, transform) -> None:
    """weight ← transform(weight) in float64, for a row-wise transform, CHUNK_BYTES of rows at a time."""
    step = max(1, CHUNK_BYTES // (8 * max(1, weight.shape[-1])))
    for start in range(0, weight.shape[0], step):
        block = weight[start:start + step]
        block.copy_(transform(block.double()))


def _untie_lm_head(model) -> bool:
    """Give lm_head its own Parameter and stop transformers from re-tying it (config and tie mapping)."""
    lm_head, embed = _get(model, "lm_head"), _get(model, "model.embed_tokens")
    # the same Parameter, or two sharing memory (a weightless meta model's are tied only by being one object)
    if lm_head.weight is not embed.weight and (lm_head.weight.is_meta or
                                               lm_head.weight.data_ptr() != embed.weight.data_ptr()):
        return False
    lm_head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    getattr(model, "all_tied_weights_keys", {}).pop("lm_head.weight", None)
    return True


def _per_head_left(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """blockdiag(matrix, …, matrix)·x: `matrix` times each block of rows of x."""
    matrix = matrix.to(device=x.device, dtype=x.dtype)  # the rotation's matrices live on the CPU; x may not
    return (matrix @ x.reshape(-1, matrix.shape[0], x.shape[-1])).reshape(x.shape)


def _per_head_right(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """x·blockdiag(matrix, …, matrix): each block of columns of x times `matrix`."""
    matrix = matrix.to(device=x.device, dtype=x.dtype)
    return (x.reshape(x.shape[0], -1, matrix.shape[0]) @ matrix).reshape(x.shape)


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

    q/k biases and gate/up biases are unchanged (only their inputs rotate). The products are done in float64, the
    Hadamards as their factors (x·H_n through the (2^a, K) view), so the same model and seed give bitwise identical
    weights. Forward pre-hooks run in registration order:
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
    embed = _get(model, "model.embed_tokens")
    rotation = ResidualRotation(embed.weight.shape[1], _get(layers[0], "self_attn").head_dim, seed, untied, apply)
    rotation.rotate_embedding(embed, names[embed])
    for layer in layers:
        rotation.rotate_layer(layer, names[layer])
    rotation.rotate_head(model.model.norm, model.lm_head, names[model.model.norm], names[model.lm_head])
    return rotation.record


class ResidualRotation:
    """rotate_llama one part at a time (the embedding, each decoder layer, the head), for a model whose parts are
    built one after another: Q is global (from the hidden size and the seed), each part's weights rotate on their
    own. The parts must come in model order (embedding, layers 0, 1, …, head) for `record` to be rotate_llama's."""

    def __init__(self, hidden: int, head_dim: int, seed: int, untied: bool, apply: bool = True):
        resid_desc = describe_hadamard(hidden)
        self.hidden = hidden
        self.signs = torch.randint(0, 2, (hidden,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
        self.h_head, head_desc = hadamard_matrix(head_dim)
        self.apply = apply
        self.record = {
            "method": "hadamard", "seed": seed,
            "residual": {**resid_desc, "definition": "Q = H_n · diag(signs)", "signs": self.signs.tolist(),
                         "weight_right_Q": [], "weight_left_QT": []},
            "head": {**head_desc, "definition": "per head: v rows ← H_hᵀ·W, o columns ← W·H_h",
                     "v_out": [], "o_in": []},
            "online": [], "folded_norms": [], "untied_lm_head": untied,
        }

    def times_q(self, x: torch.Tensor) -> torch.Tensor:
        """x·Q = (x·H_n)·diag(signs) for float64 x [..., n], H_n applied as its Kronecker factors, each a small
        dense product (spikecompile.hadamard.apply_hadamard_gemm): a few hundredths of a dense product's work,
        at GEMM speed."""
        return apply_hadamard_gemm(x, self.hidden).mul_(self.signs.to(device=x.device, dtype=torch.float64))

    def q_transposed_times(self, x: torch.Tensor) -> torch.Tensor:
        """Qᵀ·x = (xᵀ·Q)ᵀ for float64 x [n, m]."""
        return self.times_q(x.T).T

    @torch.no_grad()
    def _read_residual(self, norm, linears, names, left=None):
        """Fold γ and Q into the linears reading this norm's output; left maps a linear to its output rotation."""
        gamma = norm.weight.double()
        for linear in linears:
            if self.apply:
                _rewrite(linear, left=(left or {}).get(linear), right=lambda weight: self.times_q(weight * gamma))
            else:
                _rewrite(linear, scale=gamma)
        self.record["residual"]["weight_right_Q"] += [names[m] for m in linears]
        self.record["folded_norms"].append({"norm": names[norm], "into": [names[m] for m in linears]})
        norm.weight.fill_(1.0)

    @torch.no_grad()
    def rotate_embedding(self, embed: torch.nn.Embedding | None, name: str) -> None:
        """E ← E·Q. embed None: only recorded (its rows were rotated by a rotation of the same seed, in an earlier
        pass of the conversion)."""
        if self.apply and embed is not None:
            _rows_times(embed.weight, self.times_q)
        self.record["residual"]["weight_right_Q"].append(name)

    @torch.no_grad()
    def rotate_layer(self, layer: torch.nn.Module, name: str) -> None:
        """Fold the layer's norms and rotate its linears (`name`: the layer's module name, model.layers.<i>);
        registers the online Hadamard before down_proj."""
        if any(isinstance(hook, OnlineHadamard) for hook in _get(layer, "mlp.down_proj")._forward_pre_hooks.values()):
            raise SpikecompileError(f"rotate_llama: {name} is already rotated (down_proj has an online Hadamard hook)")
        attn, mlp = _get(layer, "self_attn"), _get(layer, "mlp")
        names = {module: f"{name}.{local}" for local, module in layer.named_modules() if local}
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            _check_rmsnorm(norm, names[norm])
        self._read_residual(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], names,
                            left={attn.v_proj: lambda weight: _per_head_left(self.h_head.T, weight)})
        if self.apply:
            _rewrite(attn.o_proj, left=self.q_transposed_times,
                     right=lambda weight: _per_head_right(weight, self.h_head))
        self._read_residual(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], names)
        inter = mlp.down_proj.in_features
        inter_desc = describe_hadamard(inter)
        if self.apply:
            _rewrite(mlp.down_proj, left=self.q_transposed_times,
                     right=lambda weight: apply_hadamard_gemm(weight, inter))
        mlp.down_proj.register_forward_pre_hook(OnlineHadamard(mlp.down_proj.in_features))
        self.record["residual"]["weight_left_QT"] += [names[attn.o_proj], names[mlp.down_proj]]
        self.record["head"]["v_out"].append(names[attn.v_proj])
        self.record["head"]["o_in"].append(names[attn.o_proj])
        self.record["online"].append({"module": names[mlp.down_proj], "where": "input", **inter_desc,
                                      "folded": "weight ← weight · H_n", "hook": "OnlineHadamard"})

    @torch.no_grad()
    def rotate_head(self, norm: torch.nn.Module, lm_head: torch.nn.Linear | None, norm_name: str,
                    head_name: str) -> None:
        """lm_head ← lm_head·diag(γ_final)·Q, γ_final ← 1 (lm_head already untied from the embedding). lm_head
        None: a forward that ends at the final norm does not need it; only the norm is folded (γ_final ← 1) and
        the record is the same."""
        _check_rmsnorm(norm, norm_name)
        if lm_head is not None:
            self._read_residual(norm, [lm_head], {norm: norm_name, lm_head: head_name})
            return
        self.record["residual"]["weight_right_Q"].append(head_name)
        self.record["folded_norms"].append({"norm": norm_name, "into": [head_name]})
        norm.weight.fill_(1.0)
