"""Analytic mode: a config alone (weights on the meta device) gives the counts a measured run gives."""

import pytest
import torch
from conftest import tiny_llama_config

from spikecompile.analytic import config_graph, load_config
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
