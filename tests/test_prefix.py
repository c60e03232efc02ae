"""The KV prefix: selection rule, and that running after it equals running the concatenated sequence."""

import torch

from spikecompile.conversion.prefix import PrefixCache, select_prefix
from spikecompile.conversion.sites import install_sites
from conftest import build_tiny_llama, build_tiny_tokenizer


def _windows(count=2, length=32):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (1, length), generator=generator) for _ in range(count)]


def test_prefix_forward_equals_the_concatenated_sequence():
    model = build_tiny_llama()
    sites = install_sites(model)
    prefix = PrefixCache(model, sites, [1, 7])
    ids = _windows(1)[0]
    with torch.inference_mode():
        full = model(torch.cat([torch.tensor([[1, 7]]), ids], dim=1)).logits[:, 2:]
        first = prefix.forward(model, ids)
        second = prefix.forward(model, ids)  # the cache is not consumed by a call
    assert torch.allclose(first, full, atol=1e-5) and torch.equal(first, second)


def test_selection_records_its_evidence():
    model = build_tiny_llama()
    install_sites(model)
    record = select_prefix(model, build_tiny_tokenizer(), _windows())
    scores = record["anchor_scores"]
    assert set(scores) >= {"<s>", "</s>"}
    best = min(scores.values(), key=lambda score: (score["outlier_tokens"], score["nll"]))
    assert scores[record["tokens"][0]] == best


def test_frequent_outlier_tokens_join_the_prefix():
    model = build_tiny_llama()
    install_sites(model)
    outlier_token = 9
    with torch.no_grad():  # token 9 drives gate and up channel 0 of layer 0: a massive down_proj input
        embedding = model.model.embed_tokens.weight[outlier_token]
        embedding.mul_(50)
        direction = embedding / model.model.layers[0].post_attention_layernorm.weight
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[0] = mlp.up_proj.weight[0] = 3 * direction / direction.norm()
    windows = _windows()
    for ids in windows:
        ids[0, 5] = ids[0, 20] = outlier_token
    record = select_prefix(model, build_tiny_tokenizer(), windows)
    assert record["outlier_counts"][str(outlier_token)] >= 2
    assert outlier_token in record["token_ids"][1:]
