"""`eval` against both baselines (issue 16, item 5): the prefix-free ANN and the float model run after the same KV
prefix, `prefixed_float_ppl` in its --json."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import convert_tiny
from transformers import AutoModelForCausalLM

from spikecompile.cli import cli
from spikecompile.data import load_text, token_windows
from transformers import AutoTokenizer


def _invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def float_ppl_after(folder, prefix_ids: list[int], windows) -> float:
    """The source model (unrotated, no spike sites), each window run after the prefix tokens in one sequence:
    exp(mean NLL of the window's predicted tokens)."""
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            sequence = torch.cat([torch.tensor([prefix_ids], dtype=ids.dtype), ids], dim=1)
            logits = model(sequence).logits[0, len(prefix_ids):-1]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            tokens += ids.shape[1] - 1
    return math.exp(nll / tokens)


@pytest.mark.parametrize("prefix", ["auto", "none"])
def test_prefixed_float_ppl_is_the_float_model_after_the_same_prefix(tmp_path, prefix):
    model = convert_tiny(tmp_path, "tiny", "--prefix", prefix)
    text = tmp_path / "calib.txt"
    result = _invoke("eval", model, "--ppl", text, "--seqlen", 48, "--max-windows", 3, "--no-progress",
                     "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "eval.json").read_text())
    record = torch.load(model, weights_only=True)
    prefix_ids = record["prefix"]["token_ids"] if record["prefix"] else []
    assert bool(prefix_ids) == (prefix == "auto")
    windows = token_windows(AutoTokenizer.from_pretrained(tmp_path / "tiny"), load_text(str(text), split="eval"), 48, 3, "test")
    assert figures["prefixed_float_ppl"] == pytest.approx(float_ppl_after(tmp_path / "tiny", prefix_ids, windows),
                                                          rel=1e-4)
    assert figures["ppl_ratio_prefixed"] == pytest.approx(figures["snn_ppl"] / figures["prefixed_float_ppl"])
    if not prefix_ids:  # no prefix: the float model with the same (no) prefix is the ANN
        assert figures["prefixed_float_ppl"] == figures["ann_ppl"]
    else:
        assert figures["prefixed_float_ppl"] != figures["ann_ppl"]
    line = next(line for line in result.output.splitlines() if "float model with the same prefix" in line)
    assert f"{figures['prefixed_float_ppl']:.4f}" in line and f"{figures['ppl_ratio_prefixed']:.4f}" in line
