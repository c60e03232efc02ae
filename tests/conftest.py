"""Shared fixtures: tiny random LLaMA models built in the test (no download, seeded)."""

import pytest
import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_llama(seed=0, **overrides):
    """A random LlamaForCausalLM with non-trivial norm weights (so folding them is actually tested)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A local Hugging Face folder (config.json + model.safetensors) holding a tiny random LLaMA."""
    folder = tmp_path / "tiny-llama"
    build_tiny_llama().save_pretrained(folder)
    return folder
