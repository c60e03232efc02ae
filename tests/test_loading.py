"""Model loading: HF folders, GGUF files, the embedded default; architecture checks before any weight is read."""

import json
import sys

import pytest
import torch

from spikecompile.errors import SpikecompileError
from spikecompile.loading import load_model, resolve_source
from conftest import build_tiny_llama, requires_smollm2


def test_folder_loads_the_same_weights(tiny_llama_dir):
    source = resolve_source(str(tiny_llama_dir))
    assert source.kind == "hf_folder" and len(source.sha256) == 64
    model, tokenizer = load_model(source)
    reference = build_tiny_llama()
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
    assert model.config._attn_implementation == "eager"
    assert tokenizer("abc")["input_ids"]


def test_mistral_style_config_is_accepted(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    assert resolve_source(str(tmp_path / "mistral")).kind == "hf_folder"


def test_non_llama_architecture_names_what_it_found(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SpikecompileError, match="GPT2LMHeadModel is not supported"):
        resolve_source(str(tmp_path / "gpt2"))


def test_non_silu_mlp_is_refused(tiny_llama_dir):
    config_path = tiny_llama_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["hidden_act"] = "gelu"
    config_path.write_text(json.dumps(config))
    with pytest.raises(SpikecompileError, match="hidden_act='gelu'"):
        resolve_source(str(tiny_llama_dir))


@pytest.mark.parametrize("name, message", [
    ("missing", "no such model folder or GGUF file"),
    ("empty_dir", "no config.json"),
    ("weights.bin", "expected a Hugging Face model folder or a .gguf file"),
    ("broken.gguf", "not a readable GGUF file"),
])
def test_bad_model_paths(tmp_path, name, message):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\1" * 60)
    with pytest.raises(SpikecompileError, match=message) as error:
        resolve_source(str(tmp_path / name))
    assert "\n" not in str(error.value)


def _write_gguf(path, architecture):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_with_other_architecture_is_refused(tmp_path):
    _write_gguf(tmp_path / "model.gguf", "gpt2")
    with pytest.raises(SpikecompileError, match="architecture model_type='gpt2' is not supported"):
        resolve_source(str(tmp_path / "model.gguf"))


def test_gguf_without_gguf_package(tmp_path, monkeypatch):
    _write_gguf(tmp_path / "model.gguf", "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(SpikecompileError, match="needs the gguf package: `pip install gguf`"):
        resolve_source(str(tmp_path / "model.gguf"))


@pytest.mark.smollm2
@requires_smollm2
def test_embedded_smollm2_loads():
    source = resolve_source(None)
    model, tokenizer = load_model(source)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_key_value_heads) == (30, 576, 3)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"
