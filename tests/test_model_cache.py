"""The model cache: a GGUF is dequantized once into an fp32 safetensors copy keyed by its sha256, read back on
later loads with identical logits and model.pt, and rebuilt (never used) when damaged."""

import json
import logging

import pytest
import torch
from click.testing import CliRunner

from conftest import FAST_CONVERT, build_tiny_llama, build_tiny_tokenizer, synthetic_text
from spikecompile.cli import cli
from spikecompile.loading import (CACHE_MANIFEST, CACHE_WEIGHTS, cache_entry, cache_root, cached_copy_is_whole,
                                  load_model, resolve_source)

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(path, seed=0):
    """A tiny random LLaMA as an F32 GGUF file, with the tiny BPE tokenizer in its header (a gpt2-model vocab)."""
    import gguf

    model, tokenizer = build_tiny_llama(seed), build_tiny_tokenizer()
    config, vocab = model.config, json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in vocab["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":  # tied to the embedding
            writer.add_tensor(_gguf_name(name), tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_name(name: str) -> str:
    if name.startswith("model.layers."):
        _, _, layer, *module, _ = name.split(".")
        return f"blk.{layer}.{GGUF_NAMES['.'.join(module)]}.weight"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKECOMPILE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def gguf_source(tmp_path):
    return resolve_source(str(write_tiny_gguf(tmp_path / "tiny.gguf")))


def _logits(model, tokenizer):
    ids = tokenizer("abc def gh abcd ef ponm", return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, model(ids).logits


def test_first_load_writes_the_copy_and_later_loads_read_it(cache, gguf_source):
    model, tokenizer = load_model(gguf_source)
    entry = cache_entry(gguf_source)
    assert entry == cache / gguf_source.sha256 and cached_copy_is_whole(entry, gguf_source)
    manifest = json.loads((entry / CACHE_MANIFEST).read_text())
    assert manifest["source_sha256"] == gguf_source.sha256 and CACHE_WEIGHTS in manifest["files"]
    expected_ids, expected = _logits(model, tokenizer)
    (cache.parent / "tiny.gguf").unlink()  # a load that still works reads the copy, not the GGUF
    cached_model, cached_tokenizer = load_model(gguf_source)
    ids, logits = _logits(cached_model, cached_tokenizer)
    assert torch.equal(ids, expected_ids) and torch.equal(logits, expected)
    assert cached_model.config.to_dict().get("quantization_config") is None
    assert cached_model.lm_head.weight.data_ptr() == cached_model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("damage", ["truncated", "altered byte", "manifest missing", "other versions"])
def test_a_damaged_copy_is_rebuilt_not_used(cache, gguf_source, damage):
    expected = _logits(*load_model(gguf_source))[1]
    entry = cache_entry(gguf_source)
    weights, manifest_path = entry / CACHE_WEIGHTS, entry / CACHE_MANIFEST
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "altered byte":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0x40  # a weight's bits: the header still parses, only the sha256 tells
        weights.write_bytes(bytes(data))
    elif damage == "manifest missing":
        manifest_path.unlink()
    else:
        manifest = json.loads(manifest_path.read_text())
        manifest["versions"]["transformers"] = "0.0.1"
        manifest_path.write_text(json.dumps(manifest))
    assert not cached_copy_is_whole(entry, gguf_source)
    assert torch.equal(_logits(*load_model(gguf_source))[1], expected)
    assert cached_copy_is_whole(entry, gguf_source)


def test_an_unwritable_cache_is_a_log_line_not_an_error(tmp_path, monkeypatch, gguf_source, caplog):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("SPIKECOMPILE_CACHE", str(tmp_path / "a-file" / "cache"))
    with caplog.at_level(logging.WARNING, logger="spikecompile"):
        model, _ = load_model(gguf_source)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert "model cache not written" in caplog.text and str(tmp_path / "a-file") in caplog.text


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKECOMPILE_CACHE", "off")
    assert cache_root() is None
    monkeypatch.delenv("SPIKECOMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "spikecompile" / "models"


def test_hf_folders_are_not_copied(cache, tiny_llama_dir):
    load_model(resolve_source(str(tiny_llama_dir)))
    assert not cache.exists()


def test_model_pt_is_byte_identical_without_cache_cold_and_warm(tmp_path, monkeypatch, gguf_source):
    """The record's source stays the GGUF (kind, path, sha256): model.pt does not tell whether the cache served."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    text = tmp_path / "calib.txt"
    text.write_text(synthetic_text())
    outputs = {}
    for run, cache_setting in [("uncached", "off"), ("cold", str(tmp_path / "cache")), ("warm", str(tmp_path / "cache"))]:
        monkeypatch.setenv("SPIKECOMPILE_CACHE", cache_setting)
        outputs[run] = tmp_path / f"{run}.pt"
        result = CliRunner().invoke(cli, ["convert", gguf_source.path, "-o", str(outputs[run]), "-T", "6",
                                          "--calib", str(text), *FAST_CONVERT])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / gguf_source.sha256 / CACHE_MANIFEST).is_file()
    data = {run: path.read_bytes() for run, path in outputs.items()}
    assert data["uncached"] == data["cold"] == data["warm"]
    record = torch.load(outputs["warm"], weights_only=True)
    assert record["source"] == {"kind": "gguf", "path": gguf_source.path, "sha256": gguf_source.sha256}


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_cached_copy_gives_identical_logits(cache):
    source = resolve_source(None)
    expected_ids, expected = _logits(*load_model(source))
    assert cached_copy_is_whole(cache_entry(source), source)
    ids, logits = _logits(*load_model(source))
    assert torch.equal(ids, expected_ids) and torch.equal(logits, expected)


@pytest.mark.parametrize("flag, shown", [("--progress", True), ("--no-progress", False)])
def test_loading_a_gguf_shows_progress_on_a_terminal(tmp_path, gguf_source, flag, shown):
    """The CLI in a subprocess whose stderr is a pseudo-terminal: the dequantization bar is drawn there."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    text = tmp_path / "calib.txt"
    text.write_text(synthetic_text())
    options = [option for option in FAST_CONVERT if option != "--no-progress"]
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm draws to its width
    environment = {**os.environ, "SPIKECOMPILE_CACHE": "off"}
    process = subprocess.Popen([sys.executable, "-m", "spikecompile", "convert", gguf_source.path, "-o",
                                str(tmp_path / "m.pt"), "--calib", str(text), "-T", "6", *options, flag],
                               stderr=secondary, stdout=subprocess.DEVNULL, env=environment)
    os.close(secondary)
    terminal = b""
    while True:
        try:
            chunk = os.read(primary, 1 << 16)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    os.close(primary)
    assert process.wait(timeout=300) == 0, terminal.decode(errors="replace")
    assert (b"de-quantizing GGUF tensors" in terminal) is shown


def test_load_progress_stays_off_a_captured_stderr(tmp_path, cache, gguf_source):
    """Not a terminal (captured): no bar at all, the load's or convert's own, so an error is the one line on
    stderr."""
    text = tmp_path / "calib.txt"
    text.write_text(synthetic_text())
    options = [option for option in FAST_CONVERT if option != "--no-progress"]
    result = CliRunner().invoke(cli, ["convert", gguf_source.path, "-o", str(tmp_path / "m.pt"), "--calib", str(text),
                                      "-T", "6", *options, "--progress"])
    assert result.exit_code == 0, result.output
    assert "de-quantizing GGUF tensors" not in result.stderr and "calibrate" not in result.stderr
    assert "fit" not in result.stderr
