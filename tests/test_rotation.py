"""Hadamard construction, the online transform, and rotate_llama's computational invariance."""

import json
import math

import pytest
import torch

from spikecompile.conversion.rotation import OnlineHadamard, rotate_llama
from spikecompile.errors import SpikecompileError
from spikecompile.hadamard import (
    _gemm_factors, apply_hadamard, apply_hadamard_gemm, describe_hadamard, hadamard_matrix,
)
from conftest import build_tiny_llama

WIDTHS = (4, 8, 12, 16, 20, 24, 28, 36, 64, 96, 576, 1536)


@pytest.mark.parametrize("n", WIDTHS)
def test_hadamard_is_orthonormal_and_flat(n):
    h, desc = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5), atol=1e-12)
    assert desc["n"] == n == desc["pow2"] * desc["k"]
    assert "random" not in desc["k_construction"]


def test_smollm2_widths_use_largest_power_of_two():
    assert hadamard_matrix(576)[1] == {"n": 576, "pow2": 16, "k": 36, "k_construction": "paley2(q=17)"}
    assert hadamard_matrix(1536)[1] == {"n": 1536, "pow2": 128, "k": 12, "k_construction": "paley1(q=11)"}


@pytest.mark.parametrize("n, pow2, q", [(52, 1, "25=5^2"), (100, 1, "49=7^2"), (344, 1, "343=7^3"),
                                        (11008, 32, "343=7^3"), (3200, 32, "49=7^2")])
def test_paley_over_prime_power_fields(n, pow2, q):
    """Widths whose K needs GF(p^m): a true Hadamard matrix (±1/√n entries, orthonormal). LLaMA-2-7B's
    intermediate 11008 becomes H_32 ⊗ H_344 (GF(7³)) instead of H_2 ⊗ H_5504: 376 multiply-adds per element
    instead of 5506, in the online Hadamard and in the down_proj fold."""
    h, desc = hadamard_matrix(n)
    assert desc["pow2"] == pow2 and desc["k"] == n // pow2 and f"(q={q}," in desc["k_construction"]
    if n <= 3200:
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5), atol=1e-12)
    else:  # the K block (the Sylvester factor is Hadamard by construction)
        from spikecompile.hadamard import hadamard_factors

        block = hadamard_factors(n)[1] * math.sqrt(desc["k"])
        assert torch.equal(block.round(), block) and torch.equal(block.abs(), torch.ones_like(block))
        assert torch.allclose(block @ block.T, desc["k"] * torch.eye(desc["k"], dtype=torch.float64), atol=1e-9)


def test_prime_field_widths_keep_their_matrices():
    """A width that a prime-field Paley construction already served keeps it (models converted before the GF(p^m)
    constructions keep their rotations): K = 28 is paley2(13), not paley1 over GF(27)."""
    assert hadamard_matrix(28)[1]["k_construction"] == "paley2(q=13)"
    assert describe_hadamard(14336) == {"n": 14336, "pow2": 512, "k": 28, "k_construction": "paley2(q=13)"}
    assert describe_hadamard(4864) == {"n": 4864, "pow2": 64, "k": 76, "k_construction": "paley2(q=37)"}


@pytest.mark.parametrize("n", (14, 172))
def test_fallback_block_is_orthonormal_and_labelled_random(n):
    h, desc = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert desc["k_construction"].startswith("random_orthogonal")
    assert torch.equal(h, hadamard_matrix(n)[0])


@pytest.mark.parametrize("n", (*WIDTHS, 14, 52))
def test_apply_hadamard_equals_dense_product(n):
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(apply_hadamard(x, n), x @ hadamard_matrix(n)[0], atol=1e-12)
    x32 = x.float()
    assert torch.allclose(apply_hadamard(x32), x32 @ hadamard_matrix(n)[0].float(), atol=1e-5)


@pytest.mark.parametrize("n", (*WIDTHS, 1, 2, 14, 52, 128, 896, 1536, 4096, 11008, 14336))
def test_gemm_hadamard_equals_dense_product(n):
    """The conversion's weight rotations (apply_hadamard_gemm): the Kronecker factors' product is √(2^a)·H_n, no
    factor is wider than GEMM_FACTOR unless it is the K block, and x·H_n matches the dense product and the
    butterfly to float64 rounding (not bit for bit: the forward passes keep apply_hadamard)."""
    from spikecompile.hadamard import GEMM_FACTOR, _factor

    factors = _gemm_factors(n)
    pow2, block, _ = _factor(n)
    assert all(f.shape[0] <= GEMM_FACTOR for f in factors[:len(factors) - (block.shape[0] > 1)])
    if n <= 1536:
        product = torch.ones(1, 1, dtype=torch.float64)
        for factor in factors:
            product = torch.kron(product, factor)
        assert torch.allclose(product / math.sqrt(pow2), hadamard_matrix(n)[0], atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    rotated = apply_hadamard_gemm(x, n)
    assert rotated.shape == x.shape
    assert torch.allclose(rotated, apply_hadamard(x, n), atol=1e-12)
    if n <= 1536:
        assert torch.allclose(rotated, x @ hadamard_matrix(n)[0], atol=1e-12)
    with pytest.raises(SpikecompileError, match="last dim of the input is"):
        apply_hadamard_gemm(x, n + 1)


@pytest.mark.parametrize("m", (1, 2, 64, 128, 4096))
def test_sylvester_rows_is_the_normalised_sylvester_product(m):
    """fold_hadamard's wide Sylvester factor: x·(H_m/√m) by factors of at most 64, the dense product to rounding;
    a width that is not a power of two is refused."""
    from spikecompile.hadamard import _sylvester, sylvester_rows

    x = torch.randn(3, m, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    torch.testing.assert_close(sylvester_rows(x), x @ _sylvester(m) / math.sqrt(m), rtol=1e-12, atol=1e-12)
    with pytest.raises(SpikecompileError, match="not a power of two"):
        sylvester_rows(torch.ones(2, 12, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_hadamard_on_cuda_matches_cpu():
    x = torch.randn(4, 576)
    assert torch.allclose(apply_hadamard(x.cuda()).cpu(), apply_hadamard(x), atol=1e-5)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _randomise_biases(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))


CONFIGS = {
    "tied_gqa": {},
    "untied": {"tie_word_embeddings": False},
    "mha": {"num_key_value_heads": 4},
    "paley_widths_gqa_6_2": {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
                             "head_dim": 12, "intermediate_size": 80},
    "biases": {"attention_bias": True, "mlp_bias": True},
}


@pytest.mark.parametrize("attn", ("eager", "sdpa"))
@pytest.mark.parametrize("config", CONFIGS)
def test_rotation_keeps_logits(config, attn):
    model = build_tiny_llama(seed=0, attn_implementation=attn, **CONFIGS[config])
    _randomise_biases(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    record = rotate_llama(model, seed=3)
    after = _logits(model, ids)
    assert (after - before).abs().max() / before.abs().max() < 1e-4
    json.dumps(record)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert record["untied_lm_head"] == (config != "untied")


def test_record_names_every_rotation(tiny_llama):
    record = rotate_llama(tiny_llama, seed=0)
    assert record["method"] == "hadamard" and record["seed"] == 0
    assert record["residual"]["n"] == 64 and len(record["residual"]["signs"]) == 64
    assert record["head"]["n"] == 16
    assert record["head"]["v_out"] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert record["online"][0] == {"module": "model.layers.0.mlp.down_proj", "where": "input", "n": 96, "pow2": 8,
                                   "k": 12, "k_construction": "paley1(q=11)", "folded": "weight ← weight · H_n",
                                   "hook": "OnlineHadamard"}
    assert [f["norm"] for f in record["folded_norms"]][-1] == "model.norm"
    assert record["folded_norms"][-1]["into"] == ["lm_head"]
    assert "model.embed_tokens" in record["residual"]["weight_right_Q"]
    assert "model.layers.1.mlp.down_proj" in record["residual"]["weight_left_QT"]


def test_untied_head_survives_tie_weights(tiny_llama):
    ids = torch.arange(10)[None]
    rotate_llama(tiny_llama, seed=0)
    expected = _logits(tiny_llama, ids)
    tiny_llama.tie_weights()
    assert not tiny_llama.config.tie_word_embeddings
    assert tiny_llama.lm_head.weight.data_ptr() != tiny_llama.model.embed_tokens.weight.data_ptr()
    assert torch.equal(_logits(tiny_llama, ids), expected)


def test_rotation_is_deterministic_and_seeded():
    a, b, c = build_tiny_llama(seed=0), build_tiny_llama(seed=0), build_tiny_llama(seed=0)
    rotate_llama(a, seed=5)
    rotate_llama(b, seed=5)
    rotate_llama(c, seed=6)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["model.embed_tokens.weight"], state_c["model.embed_tokens.weight"])


def test_later_pre_hook_sees_rotated_input(tiny_llama):
    down, ids = tiny_llama.model.layers[0].mlp.down_proj, torch.arange(6)[None]
    plain = []
    handle = down.register_forward_pre_hook(lambda module, args: plain.append(args[0]))
    _logits(tiny_llama, ids)
    handle.remove()
    rotate_llama(tiny_llama, seed=0)
    seen = []
    down.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    _logits(tiny_llama, ids)
    assert isinstance(next(iter(down._forward_pre_hooks.values())), OnlineHadamard)
    assert torch.allclose(seen[0], plain[0] @ hadamard_matrix(96)[0].float(), atol=1e-5)


def test_rotating_twice_is_refused(tiny_llama):
    rotate_llama(tiny_llama, seed=0)
    with pytest.raises(SpikecompileError, match="already rotated"):
        rotate_llama(tiny_llama, seed=0)


def _max_over_rms_at_q_proj(model, ids):
    captured = []
    handle = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
        lambda module, args: captured.append(args[0]))
    _logits(model, ids)
    handle.remove()
    x = captured[0]
    return (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean().item()


@pytest.mark.parametrize("where", ("residual", "norm_weight"))
def test_rotation_removes_planted_outlier_channel(where):
    model = build_tiny_llama(seed=0)
    with torch.no_grad():
        if where == "residual":
            model.model.embed_tokens.weight[:, 7] *= 200.0
        else:
            model.model.layers[1].input_layernorm.weight[7] = 40.0
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    before = _max_over_rms_at_q_proj(model, ids)
    rotate_llama(model, seed=0)
    after = _max_over_rms_at_q_proj(model, ids)
    assert before > 6.0 and after < before / 2


@pytest.mark.parametrize("n", [8, 24, 20, 36])
def test_rotation_factors_are_its_matrix(n):
    """Rotation.factors() (what the fixed-point runs apply: Aᵀ·X·B per block, signs before or after) is matrix():
    the Kronecker product exactly, and the factored product equal to x·matrix() up to float64 rounding, with and
    without signs, transposed or not, on several blocks."""
    from spikecompile.ir import Rotation
    from spikecompile.hadamard import describe_hadamard
    from spikecompile.passes.fixed_point import OPS

    signs = torch.where(torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5, -1, 1).to(torch.int8)
    x = torch.randn(3, 5, 2 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for transpose in (False, True):
        for node_signs in (None, signs):
            node = Rotation(n=n, where="online", construction=describe_hadamard(n), signs=node_signs,
                            transpose=transpose)
            before, left, right, after = node.factors()
            assert torch.equal(before[:, None] * torch.kron(left, right) * after[None, :], node.matrix())
            expected = (x.reshape(3, 5, 2, n) @ node.matrix()).reshape(x.shape)
            assert torch.allclose(OPS[Rotation](node, x), expected, rtol=0, atol=1e-12)


def test_row_blocked_rewrites_equal_whole_ones(monkeypatch):
    """Right-only weight rewrites (the embedding, q/k/gate/up, lm_head) run on blocks of rows so that a large
    vocabulary never exists whole in float64 (rotation.CHUNK_BYTES): blocks of 3 rows give the same weights, bit for
    bit, as one block."""
    import spikecompile.conversion.rotation as rotation

    whole, blocked = build_tiny_llama(seed=4), build_tiny_llama(seed=4)
    rotate_llama(whole, seed=1)
    monkeypatch.setattr(rotation, "CHUNK_BYTES", 3 * 8 * whole.config.hidden_size)
    rotate_llama(blocked, seed=1)
    for (name, expected), (_, found) in zip(whole.state_dict().items(), blocked.state_dict().items(), strict=True):
        assert torch.equal(expected, found), name


def test_a_model_converted_with_another_hadamard_matrix_is_refused(tmp_path):
    """A model.pt whose rotation record names another construction for a width (an earlier version's matrix, e.g.
    LLaMA-2-7B's 11008 before GF(7³)) is refused by eval and build with one line that says to re-convert: never
    run with a matrix it was not calibrated with."""
    from click.testing import CliRunner

    from conftest import convert_tiny
    from spikecompile import modelfile
    from spikecompile.cli import cli

    path = convert_tiny(tmp_path)
    record = modelfile.load(path)
    record["rotation"]["residual"]["k_construction"] = "paley1(q=5503)"
    stale = tmp_path / "stale.pt"
    modelfile.save(record, stale)
    for command in (["eval", str(stale), "--ppl", str(tmp_path / "calib.txt"), "--seqlen", "32", "--max-windows",
                     "1", "--no-progress"],
                    ["build", str(stale), "--target", "ir", "-o", str(tmp_path / "ir"), "--no-progress"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code != 0
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "re-convert" in lines[0] and "stale.pt" in lines[0], result.output
    assert not (tmp_path / "ir").exists()
