"""Analytic mode: a config alone (weights on the meta device) gives the counts a measured run gives."""

import json

import pytest
import torch
from conftest import tiny_llama_config

from spikecompile.analytic import MODEL_CONFIGS, config_graph, load_config
from spikecompile.backends.sim import simulate
from spikecompile.backends.sim.analytic import analytic_run
from spikecompile.backends.sim.results import Counts, rates_by_kind
from spikecompile.errors import SpikecompileError
from spikecompile.ir import Input, Linear

KINDS = ("attn_norm", "q", "k", "v", "attn_probs", "o_proj_in", "mlp_norm", "silu", "down_proj_in", "final_norm")


@pytest.fixture(scope="module")
def config():
    return tiny_llama_config().to_dict()


@pytest.fixture(scope="module")
def graph(config):
    return config_graph(config, timesteps=6)


def test_the_graph_of_a_config_has_the_model_s_shapes(config, graph):
    linears = [name for name in graph if isinstance(graph[name], Linear)]
    assert len(linears) == 7 * config["num_hidden_layers"] + 1
    assert graph["layers.0.mlp.down_proj"].weight.shape == (config["hidden_size"], config["intermediate_size"])
    assert {graph[name].timesteps for name in graph} == {6}


def test_uniform_spikes_give_the_analytic_counts(graph):
    """A measured run whose spikes are exactly rate·elements per step, spread uniformly, is the analytic run:
    the ANN counts match exactly and the linear layers' SNN counts too."""
    rate = 0.25
    analytic = analytic_run(graph, 16, {kind: rate for kind in KINDS})
    for name, counts in analytic.snn.items():
        if isinstance(graph[name], Linear):
            (source,) = graph.inputs(name).values()
            site = graph[source].site
            elements, steps = analytic.sites[site]["elements"], 6
            assert counts.ac == pytest.approx(rate * elements * steps * graph[name].weight.shape[0])
    total = sum(analytic.snn.values(), Counts())
    assert total.spike_writes == pytest.approx(sum(sum(s["spikes_per_step"]) for s in analytic.sites.values()))


def test_analytic_ann_equals_a_measured_ann(graph, config):
    """The ANN column needs no rates: the analytic one equals the one counted on a real run of the same shape."""
    from conftest import build_tiny_llama
    from spikecompile.conversion.convert import SpikingModel
    from spikecompile.conversion.rotation import OnlineHadamard
    from spikecompile.conversion.sites import install_sites
    from spikecompile.frontend import trace
    from spikecompile.neuron import base2_params
    from spikecompile.passes import PassManager

    model = build_tiny_llama()
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(OnlineHadamard(layer.mlp.down_proj.in_features))
    sites = install_sites(model)
    neuron = base2_params(torch.tensor(1.0), 6, 2)
    record = {"coding": {"timesteps": 6}, "rotation": None, "prefix": None,
              "sites": {name: vars(neuron) for name in sites}}
    measured_graph, store = trace(SpikingModel(model, None, sites, record))
    measured_graph, _ = PassManager(["assign_timesteps"]).run(measured_graph)
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    measured = simulate(measured_graph, store, ids, "decoded")
    analytic = analytic_run(graph, 16, rates_by_kind(measured))
    assert analytic.ann == measured.ann
    assert rates_by_kind(measured).keys() == set(KINDS)


def test_bad_rates_and_configs(graph, tmp_path):
    with pytest.raises(SpikecompileError, match="no rate for site kind"):
        analytic_run(graph, 8, {"q": 0.1})
    with pytest.raises(SpikecompileError, match="silu = 1.5 is not a rate"):
        analytic_run(graph, 8, {kind: 1.5 if kind == "silu" else 0.1 for kind in KINDS})
    path = tmp_path / "c.json"
    path.write_text('{"hidden_size": 64}')
    with pytest.raises(SpikecompileError, match="config field intermediate_size missing"):
        load_config(path)
    assert not any(isinstance(graph[name], Input) and graph[name].dtype != "int64" for name in graph)


# ---- the packaged configs: every LLaMA-family architecture -----------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_each_packaged_config_reports_in_analytic_mode(name, tmp_path):
    from click.testing import CliRunner

    from spikecompile.cli import cli

    rates = [f"--rate={kind}=0.1" for kind in KINDS]
    result = CliRunner().invoke(cli, ["report", "--config", name, *rates, "--seq-len", "16", "-T", "4",
                                      "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    layers = load_config(name)["num_hidden_layers"]
    assert [entry["layer"] for entry in report["ledger"]["layers"]] == [*range(layers), None]


def test_config_graphs_follow_each_family():
    qwen = config_graph(load_config("qwen2.5-0.5b"), timesteps=4)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert qwen[f"layers.23.self_attn.{proj}"].bias.name == f"model.layers.23.self_attn.{proj}.bias"
    assert qwen["layers.0.self_attn.o_proj"].bias is None and qwen["layers.0.mlp.down_proj"].bias is None
    assert qwen["lm_head"].weight.name == "model.embed_tokens.weight"  # tied: one tensor
    assert qwen["layers.0.self_attn.scores"].groups == 7  # 14 heads over 2 KV heads
    llama3 = config_graph(load_config("llama-3-8b"), timesteps=4)
    assert llama3["layers.0.self_attn.scores"].groups == 4 and llama3["lm_head"].weight.shape == (128256, 4096)
    assert llama3["layers.0.self_attn.q_proj"].bias is None


def test_llama3_rope_scaling_is_transformers_scaled_inv_freq():
    """The RoPE nodes hold exactly the inv_freq transformers' llama3 rule gives (low frequencies divided by the
    factor, a smooth band between), not the unscaled θ^(−2j/d)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = load_config("llama-3-8b")
    rope = config_graph(config, timesteps=4)["layers.31.self_attn.k_rope"]
    fields = {key: value for key, value in config.items() if key not in ("source", "_file")}
    expected, scaling = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**fields), "cpu")
    assert torch.equal(rope.inv_freq, expected.float()) and rope.attention_scaling == scaling == 1.0
    assert rope.parameters["rope_type"] == "llama3" and rope.parameters["factor"] == 8.0
    unscaled = 500000.0 ** -(torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    assert torch.allclose(rope.inv_freq[:8], unscaled[:8]) and torch.allclose(rope.inv_freq[-8:], unscaled[-8:] / 8)


@pytest.mark.parametrize("fields, message", [
    ({"model_type": "gpt2"}, "architecture model_type='gpt2' is not supported"),
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "architecture GemmaForCausalLM is not supported"),
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768},
     "sliding_window=4096 is smaller than max_position_embeddings=32768"),
])
def test_config_of_another_architecture_is_refused(tmp_path, fields, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**tiny_llama_config().to_dict(), **fields}))
    with pytest.raises(SpikecompileError, match=message) as error:
        config_graph(load_config(path), timesteps=4)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
