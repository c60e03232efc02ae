"""Model loading: HF folders, GGUF files, the embedded default; architecture checks before any weight is read."""

import json
import sys

import pytest
import torch

from spikecompile.errors import SpikecompileError
from spikecompile.loading import load_model, resolve_source
from conftest import build_tiny_llama, build_tiny_tokenizer, requires_smollm2, save_tiny_llama


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


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.mark.parametrize("window", [None, 256])
def test_mistral_without_a_binding_sliding_window_loads_full_causal(tmp_path, window):
    """sliding_window null, or at least max_position_embeddings (it cannot bind): accepted, and the model is
    built without the window (full causal attention, what the IR computes)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**TINY, max_position_embeddings=256, sliding_window=window)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    build_tiny_tokenizer().save_pretrained(tmp_path / "mistral")
    model, _ = load_model(resolve_source(str(tmp_path / "mistral")))
    assert type(model).__name__ == "MistralForCausalLM" and model.config.sliding_window is None


@pytest.mark.parametrize("family, fields", [
    ("mistral", {"sliding_window": 32, "max_position_embeddings": 256}),
    ("mistral", {}),  # MistralConfig's default window, 4096, is smaller than its default context, 131072
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1,
               "max_position_embeddings": 256}),
])
def test_a_binding_sliding_window_is_refused_naming_the_field(tmp_path, family, fields):
    config = {"model_type": family, **TINY, **fields}
    folder = save_tiny_llama(tmp_path / family)  # real weights; only config.json is the other family's
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpikecompileError, match=r"config.json: sliding_window=(32|4096) is smaller than "
                                                r"max_position_embeddings=(256|131072)") as error:
        resolve_source(str(folder))
    assert "\n" not in str(error.value)


def test_qwen2_config_is_accepted(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**TINY, sliding_window=32, max_window_layers=1)  # use_sliding_window false: inert
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen2")
    assert resolve_source(str(tmp_path / "qwen2")).kind == "hf_folder"


@pytest.mark.parametrize("family, model_class", [("phi3", "Phi3ForCausalLM"), ("gemma", "GemmaForCausalLM"),
                                                 ("qwen3", "Qwen3ForCausalLM")])
def test_other_llama_like_families_are_refused_naming_them(tmp_path, family, model_class):
    import transformers

    config = transformers.AutoConfig.for_model(family, **TINY, head_dim=8, pad_token_id=0, bos_token_id=1,
                                               eos_token_id=2)
    getattr(transformers, model_class)(config).save_pretrained(tmp_path / family)
    with pytest.raises(SpikecompileError, match=f"architecture {model_class} is not supported; spikecompile "
                                                f"converts LLaMA-family models") as error:
        resolve_source(str(tmp_path / family))
    assert "\n" not in str(error.value)


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


def test_gguf_of_a_qwen2_model_passes_the_architecture_check(tmp_path):
    _write_gguf(tmp_path / "model.gguf", "qwen2")
    assert resolve_source(str(tmp_path / "model.gguf")).kind == "gguf"


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
