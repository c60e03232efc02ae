"""Spike sites at the reference placement, installed by hooks on the real transformers model."""

import pytest
import torch

from spikecompile.conversion.calibration import collect_samples
from spikecompile.conversion.sites import LAYER_SITE_KINDS, install_sites
from spikecompile.errors import SpikecompileError
from spikecompile.neuron import base2_params
from conftest import build_tiny_llama


def _ids(length=24, seed=0):
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def test_all_sites_off_equals_the_ann_exactly():
    ann = build_tiny_llama()
    ann.config._attn_implementation = "eager"
    spiking = build_tiny_llama()
    sites = install_sites(spiking)
    assert len(sites) == 2 * len(LAYER_SITE_KINDS) + 1
    with torch.no_grad():
        assert torch.equal(spiking(_ids()).logits, ann(_ids()).logits)


def test_every_site_sees_its_activation():
    model = build_tiny_llama()
    sites = install_sites(model)
    samples = collect_samples(lambda ids: model(ids).logits, sites, [_ids(), _ids(seed=1)], samples_per_site=256, seed=0,
                                       progress=False)
    assert samples.shape == (len(sites), 256)
    shapes = {}
    for site in sites.values():
        site.forward = (lambda original, name: lambda x: shapes.setdefault(name, x.shape) and original(x))(
            site.forward, site.name)
    with torch.no_grad():
        model(_ids())
    heads, kv_heads, head_dim, hidden, inter = 4, 2, 16, 64, 96
    expected = {"attn_norm": (1, 24, hidden), "q": (1, heads, 24, head_dim), "k": (1, kv_heads, 24, head_dim),
                "v": (1, kv_heads, 24, head_dim), "attn_probs": (1, heads, 24, 24),
                "o_proj_in": (1, 24, heads * head_dim), "mlp_norm": (1, 24, hidden), "silu": (1, 24, inter),
                "down_proj_in": (1, 24, inter)}
    for layer in range(2):
        for kind, shape in expected.items():
            assert shapes[f"layers.{layer}.{kind}"] == shape, kind
    assert shapes["final_norm"] == (1, 24, hidden)
    probs = samples[list(sites).index("layers.0.attn_probs")]
    assert probs.min() >= 0 and probs.max() <= 1
    silu = samples[list(sites).index("layers.1.silu")]
    assert silu.min() >= -0.2785


def test_decoded_sites_quantize_every_site_independently():
    ann = build_tiny_llama()
    model = build_tiny_llama()
    sites = install_sites(model)
    with torch.no_grad():
        reference = ann(_ids()).logits
        for name, site in sites.items():
            sites.set_mode("off")
            site.neuron = base2_params(torch.tensor(8.0), T=4)
            site.mode = "decoded"
            changed = model(_ids()).logits
            assert not torch.equal(changed, reference), f"site {name} had no effect"
            assert torch.isfinite(changed).all()


def test_calibration_names_the_site_with_nan():
    model = build_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("nan")
    sites = install_sites(model)
    with pytest.raises(SpikecompileError, match="site layers.1.silu: NaN/inf activations"):
        collect_samples(lambda ids: model(ids).logits, sites, [_ids()], samples_per_site=64, seed=0, progress=False)


def test_calibration_samples_are_deterministic():
    results = []
    for _ in range(2):
        model = build_tiny_llama()
        sites = install_sites(model)
        forward = model.forward
        results.append(collect_samples(lambda ids, forward=forward: forward(ids).logits, sites,
                                       [_ids(), _ids(seed=3)], 128, seed=5, progress=False))
    assert torch.equal(*results)


def test_decoded_mode_needs_fitted_neurons():
    sites = install_sites(build_tiny_llama())
    with pytest.raises(SpikecompileError, match="no fitted neuron"):
        sites.set_mode("decoded")


def test_calibration_samples_keep_each_windows_extreme():
    model = build_tiny_llama()
    sites = install_sites(model)
    windows = [_ids(), _ids(seed=1)]
    samples = collect_samples(lambda ids: model(ids).logits, sites, windows, 64, seed=0, progress=False)
    true_max = {}
    for site in sites.values():  # every value each site sees, measured independently of the recorder
        site.forward = (lambda name: lambda x: true_max.update({name: max(true_max.get(name, 0.0),
                                                                          float(x.abs().max()))}) or x)(site.name)
    with torch.no_grad():
        for ids in windows:
            model(ids)
    assert torch.equal(samples.abs().amax(-1), torch.tensor([true_max[name] for name in sites]))
