"""The real embedded SmolLM2-135M-Instruct end to end (slow: run with `pytest -m slow`)."""

import pytest
import torch
from click.testing import CliRunner

from spikecompile.cli import cli
from spikecompile.conversion.convert import load_spiking_model
from spikecompile.data import load_text, token_windows
from spikecompile.evaluation import perplexity

from conftest import requires_smollm2

pytestmark = [pytest.mark.slow, pytest.mark.smollm2, requires_smollm2]


@pytest.fixture(scope="module")
def smollm2_t8(tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2") / "model.pt"
    result = CliRunner().invoke(cli, ["convert", "-o", str(path), "-T", "8", "--calib-windows", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    return load_spiking_model(str(path))


def test_smollm2_t8_stays_close_to_the_ann(smollm2_t8):
    assert len(smollm2_t8.sites) == 30 * 9 + 1
    windows = token_windows(smollm2_t8.tokenizer, load_text("builtin", "eval"), 512, 2, "evaluation")
    ann = perplexity(smollm2_t8.ann_logits, windows, progress=False)
    snn = perplexity(smollm2_t8.logits, windows, progress=False)
    assert 1.0 < snn / ann < 1.10


def test_smollm2_sites_never_lose_to_base2(smollm2_t8):
    for name, entry in smollm2_t8.record["sites"].items():
        calib = entry["calibration"]
        assert calib["mse"] <= calib["base2_mse"] * (1 + 1e-6), name
        assert calib["lloyd_max_mse"] <= calib["mse"], name


def test_smollm2_rotation_keeps_the_float_model(smollm2_t8):
    from spikecompile.loading import load_model, resolve_source

    original, tokenizer = load_model(resolve_source(None))
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = original(ids).logits
        rotated = smollm2_t8.ann_logits(ids)
    assert (rotated - reference).abs().max() <= 1e-4 * reference.abs().max()
