"""End to end through the CLI on a tiny random LLaMA folder: convert, eval, model.pt, bad input."""

import json

import pytest
import torch
from click.testing import CliRunner

from spikecompile import modelfile
from spikecompile.cli import cli
from spikecompile.conversion.convert import load_spiking_model
from spikecompile.conversion.rotation import rotate_llama
from conftest import build_tiny_llama

FAST = ["--calib-seqlen", "64", "--calib-windows", "2", "--samples-per-site", "512", "--no-progress"]


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One tiny conversion shared by the tests that only read it (T=6, 2 grains, Hadamard rotation)."""
    from conftest import save_tiny_llama, synthetic_text

    root = tmp_path_factory.mktemp("converted")
    folder = save_tiny_llama(root / "tiny")
    text = root / "calib.txt"
    text.write_text(synthetic_text())
    result = run("convert", folder, "-o", root / "model.pt", "-T", 6, "-n", 2, "--calib", text, *FAST,
                 "--json", root / "report.json")
    assert result.exit_code == 0, result.output
    return root, folder, text


def test_convert_writes_a_complete_model_file(converted):
    root, folder, text = converted
    record = modelfile.load(root / "model.pt")
    assert record["coding"] == {"name": "phase", "timesteps": 6, "grains": 2}
    assert record["source"]["kind"] == "hf_folder" and record["rotation"]["seed"] == 0
    assert record["calibration"]["source"] == str(text) and record["calibration"]["windows"] == 2
    assert len(record["sites"]) == 2 * 9 + 1
    for name, entry in record["sites"].items():
        calib = entry["calibration"]
        assert calib["mse"] <= calib["base2_mse"] * (1 + 1e-6), name
        assert calib["lloyd_max_mse"] <= calib["mse"] * (1 + 1e-3), name
        assert entry["genotype"].tolist() == [0, 0, 0, 1, 1, 1]
        assert entry["samples"].shape == (512,)
    report = json.loads((root / "report.json").read_text())
    assert set(report["timings_s"]) == {"load", "prefix", "calibration", "fitting"}


def test_reloaded_model_runs_the_fitted_neurons(converted):
    root, _, _ = converted
    spiking = load_spiking_model(str(root / "model.pt"))
    ids = torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(0))
    ann = build_tiny_llama()
    ann.config._attn_implementation = "eager"
    with torch.no_grad():
        snn_logits = spiking.model(ids).logits
        spiking.sites.set_mode("off")
        rotated_logits = spiking.model(ids).logits
        ann_logits = ann(ids).logits
    assert (rotated_logits - ann_logits).abs().max() <= 1e-4 * ann_logits.abs().max()
    relative_rms_error = (snn_logits - ann_logits).std() / ann_logits.std()
    assert 0 < relative_rms_error < 0.3  # a random tiny model at T=6: the neurons run, and roughly agree


def test_eval_prints_ppl_and_site_errors(converted, tmp_path):
    root, _, text = converted
    result = run("eval", root / "model.pt", "--ppl", text, "--seqlen", 64, "--max-windows", 3, "--no-progress",
                 "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    assert "ratio SNN/ANN" in result.output and "layers.1.down_proj_in" in result.output
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert figures["windows"] == 3 and len(figures["sites"]) == 19
    assert figures["ppl_ratio"] == pytest.approx(figures["snn_ppl"] / figures["ann_ppl"])
    assert 0.5 < figures["ppl_ratio"] < 2


def test_same_inputs_give_a_byte_identical_file(tiny_llama_dir, text_file, tmp_path):
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    for name in ("a.pt", "b.pt"):
        result = run("convert", tiny_llama_dir, "-o", tmp_path / name, "-T", 4, "-n", 2, "--calib", text_file,
                     *FAST, env=env)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert modelfile.load(tmp_path / "a.pt")["conversion"]["created_utc"] == "2023-11-14T22:13:20Z"


def test_las_coding_keeps_base_two(tiny_llama_dir, text_file, tmp_path):
    result = run("convert", tiny_llama_dir, "-o", tmp_path / "las.pt", "--coding", "las", "--rotate", "none",
                 "-T", 4, "--calib", text_file, *FAST)
    assert result.exit_code == 0, result.output
    record = modelfile.load(tmp_path / "las.pt")
    assert record["rotation"] is None
    for entry in record["sites"].values():
        assert torch.all(entry["d"] == 2) and torch.all(entry["h"] == 2) and torch.all(entry["theta"] == 2)


def _assert_one_line_error(result, message):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("options, message", [
    (["-T", 3], "--timesteps 3: must be in 4..16"),
    (["-T", 17], "--timesteps 17: must be in 4..16"),
    (["-T", 8, "-n", 5], "--grains 5: must be in 1..T/2 = 1..4"),
    (["--coding", "morse"], "--coding 'morse': unknown coding; choose one of phase, las"),
    (["--rotate", "fourier"], "--rotate 'fourier'"),
])
def test_bad_options(tiny_llama_dir, text_file, tmp_path, options, message):
    result = run("convert", tiny_llama_dir, "-o", tmp_path / "m.pt", "--calib", text_file, *FAST, *options)
    _assert_one_line_error(result, message)
    assert not (tmp_path / "m.pt").exists()


def test_bad_calibration_text(tiny_llama_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("abc abd\n")
    for name in ("empty.txt", "short.txt"):
        result = run("convert", tiny_llama_dir, "-o", tmp_path / "m.pt", "--calib", tmp_path / name, *FAST)
        _assert_one_line_error(result, f"{tmp_path / name}: calibration text has")
    _assert_one_line_error(run("convert", tiny_llama_dir, "--calib", tmp_path / "nope.txt", *FAST),
                           "nope.txt: no such text file")
    assert not (tmp_path / "m.pt").exists()


def test_bad_model_and_output_paths(tiny_llama_dir, text_file, tmp_path):
    _assert_one_line_error(run("convert", tmp_path / "nowhere", "-o", tmp_path / "m.pt", *FAST),
                           "nowhere: no such model folder or GGUF file")
    _assert_one_line_error(run("convert", tiny_llama_dir, "-o", tmp_path / "no" / "m.pt", *FAST),
                           "does not exist")


def test_eval_refuses_bad_model_files(converted, tmp_path):
    root, folder, text = converted
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((root / "model.pt").read_bytes()[:1000])
    _assert_one_line_error(run("eval", truncated, "--ppl", text), "truncated, corrupt or not a torch file")
    _assert_one_line_error(run("eval", tmp_path / "none.pt", "--ppl", text), "no such model file")


def test_eval_notices_a_changed_source(converted, tmp_path):
    root, folder, text = converted
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    record = modelfile.load(root / "model.pt")
    record["source"]["path"] = str(tmp_path / "gone")
    modelfile.save({key: record[key] for key in modelfile.REQUIRED_KEYS}, tmp_path / "m.pt")
    _assert_one_line_error(run("eval", tmp_path / "m.pt", "--ppl", text, "--seqlen", 64),
                           "no longer exists; restore it or re-convert")
    result = run("eval", tmp_path / "m.pt", "--ppl", text, "--seqlen", 64, "--max-windows", 1, "--source", moved,
                 "--no-progress")
    assert result.exit_code == 0, result.output
    (moved / "config.json").write_text((moved / "config.json").read_text().replace("64", "64 "))
    _assert_one_line_error(run("eval", tmp_path / "m.pt", "--ppl", text, "--source", moved),
                           "has changed since conversion")


def test_rotation_is_reapplied_identically():
    first, second = build_tiny_llama(), build_tiny_llama()
    assert rotate_llama(first, seed=3) == rotate_llama(second, seed=3)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_mistral_model_converts_and_runs(tmp_path, text_file):
    from transformers import MistralConfig, MistralForCausalLM
    from conftest import build_tiny_tokenizer

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    build_tiny_tokenizer().save_pretrained(tmp_path / "mistral")
    result = run("convert", tmp_path / "mistral", "-o", tmp_path / "m.pt", "-T", 6, "--calib", text_file, *FAST)
    assert result.exit_code == 0, result.output
    result = run("eval", tmp_path / "m.pt", "--ppl", text_file, "--seqlen", 64, "--max-windows", 1, "--no-progress")
    assert result.exit_code == 0 and "ratio SNN/ANN" in result.output, result.output


def test_mistral_with_a_binding_sliding_window_is_refused_in_one_line(tmp_path, text_file):
    """Mistral-7B-v0.1's kind of config (a 32-token window in a 256-token context): the IR's attention is full
    causal, so convert refuses it, naming the field, before reading a weight and writing anything."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=32)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    result = run("convert", tmp_path / "mistral", "-o", tmp_path / "m.pt", "--calib", text_file, *FAST)
    _assert_one_line_error(result, "sliding_window=32 is smaller than max_position_embeddings=256")
    assert not (tmp_path / "m.pt").exists()
