"""sdllm with per-token min-max scales (issue 16, item 6): the scale is each token's max|x| / K at run time, the
conversion path (eval) runs it, and build refuses it with one line naming the option."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import convert_tiny

from spikecompile.cli import cli
from spikecompile.conversion.codings import sdllm_per_token
from spikecompile.conversion.convert import load_spiking_model


def _invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def hand_per_token(x: torch.Tensor, T: int) -> torch.Tensor:
    """Round each row to the nearest multiple of max|row|/K (ties toward zero), K = T − 1 levels per sign."""
    K = T - 1
    out = torch.zeros_like(x)
    for index, row in enumerate(x.reshape(-1, x.shape[-1])):
        step = float(row.abs().max()) / K
        if step == 0:
            continue
        counts = [min(max(int(torch.ceil(torch.tensor(abs(float(v)) / step - 0.5))), 0), K) for v in row]
        out.reshape(-1, x.shape[-1])[index] = torch.tensor([c * step for c in counts]) * row.sign()
    return out


@pytest.mark.parametrize("T", [4, 8])
def test_per_token_quantizer_is_min_max_rounding_per_row(T):
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(T))
    x[1, 2] = 0.0  # a row of zeros stays zero
    got = sdllm_per_token(x, T)
    assert torch.allclose(got, hand_per_token(x.double(), T).float(), rtol=1e-6, atol=0)  # float32 rounding
    peaks = x.abs().amax(-1)
    assert torch.allclose(got.abs().amax(-1), peaks, rtol=1e-6)  # each row's largest value is a level: K · max/K
    assert got[1, 2].abs().sum() == 0
    levels = (got / (peaks.unsqueeze(-1) / (T - 1)).clamp_min(1e-30)).round()
    assert int(levels.abs().max()) == T - 1 and torch.allclose(levels * peaks.unsqueeze(-1) / (T - 1), got, rtol=1e-5)


@pytest.fixture(scope="module")
def per_token_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdllm")
    return root, convert_tiny(root, "pt", "--coding", "sdllm", "-T", "8", "--sdllm-scales", "per-token")


def test_per_token_model_runs_its_sites_per_token_and_evals(per_token_model, tmp_path):
    root, model = per_token_model
    spiking = load_spiking_model(str(model))
    assert spiking.record["coding"]["scales"] == "per-token"
    site = spiking.sites["layers.0.silu"]
    assert site.per_token_steps == 8
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(site(x), sdllm_per_token(x, 8))
    result = _invoke("eval", model, "--ppl", root / "calib.txt", "--seqlen", 48, "--max-windows", 2, "--no-progress",
                     "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert figures["coding"]["scales"] == "per-token" and figures["snn_ppl"] > 0


def test_build_refuses_a_per_token_model_in_one_line(per_token_model, tmp_path):
    _, model = per_token_model
    result = _invoke("build", model, "--target", "ir", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: {model}: converted with --sdllm-scales "
                                                                        f"per-token")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    (("--sdllm-scales", "per-token"), "--sdllm-scales per-token: SDLLM's run-time min-max scales; use it with --coding sdllm"),
    (("--coding", "sdllm", "-T", "8", "--sdllm-scales", "per-token", "--membrane-clip", "0.2"),
     "without --membrane-clip"),
    (("--coding", "sdllm", "-T", "8", "--sdllm-scales", "dynamic"), "--sdllm-scales 'dynamic': choose one of static, per-token"),
])
def test_bad_sdllm_scales_options(tmp_path, options, message):
    result = _invoke("convert", tmp_path / "missing", "-o", tmp_path / "m.pt", *options)
    assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "m.pt").exists()
