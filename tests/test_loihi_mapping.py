"""The Loihi 2 mapping pass: limits from targets/loihi2.toml, placement of IR graphs (traced from a converted model,
or from a config alone), traffic from measured firing rates, and the diagnostics of what does not fit."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import convert_tiny, tiny_llama_config
from test_budget_lowering import ZOO, zoo_graph, zoo_neurons

from spikecompile.analytic import MODEL_CONFIGS, load_config as model_config, map_config
from spikecompile.build import BuildOptions, build
from spikecompile.errors import SpikecompileError
from spikecompile.hardware.loihi2 import (
    LIMITS,
    budget_counter_bits,
    flip_level,
    grid_bits,
    load_loihi2,
    potential_exponent,
    potential_level,
    residual_schedule,
)
from spikecompile.ir import Linear, PhaseNeuron
from spikecompile.neuron import base2_params, magnitude_spikes, phase_quantize
from spikecompile.passes import CompileInputs, PassManager
from spikecompile.passes.loihi_mapping import map_loihi2

CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(convert_tiny(tmp_path_factory.mktemp("mapping")), BuildOptions())


@pytest.fixture(scope="module")
def samples(built):
    return {name: entry["samples"] for name, entry in built.record["sites"].items() if "samples" in entry}


def _synapse_layers(graph):
    return [graph[name] for name in graph
            if isinstance(graph[name], Linear) and isinstance(graph[graph.inputs(name)["x"]], PhaseNeuron)]


def test_every_limit_has_a_value_a_unit_and_a_source(tmp_path):
    target = load_loihi2()
    assert set(target.limits) == set(LIMITS) and target.systems["kapoho_point"] == 8
    assert all(target.sources[f"limits.{name}"] for name in LIMITS)
    broken = tmp_path / "loihi2.toml"
    broken.write_text("[limits.weight_bits]\nvalue = 8\nunit = 'bits'\nsource = 'lava'\n")
    with pytest.raises(SpikecompileError, match=r"loihi2.toml: \[limits.cores_per_chip\] must give"):
        load_loihi2(broken)


def test_tiny_model_fits_one_chip_with_measured_rates(built, samples):
    report = map_loihi2(built.graph, built.store, samples=samples, context=16)
    layers = _synapse_layers(built.graph)
    assert report["synapses"] == sum(layer.in_features * layer.out_features for layer in layers)
    assert report["units"] == {"sites": 19, "synapse_layers": len(layers)}
    assert report["cores"]["synapse"] == len(layers) and report["chips"] == 1 and report["does_not_fit"] == []
    assert report["rates"]["source"] == "measured on calibration samples"
    assert all(0 < rate < 1 for rate in report["rates"]["by_kind"].values())
    traffic = report["traffic_per_token"]
    assert 0 < traffic["to_ops"] < traffic["spikes"] and traffic["inter_chip"] == 0
    given = map_loihi2(built.graph, built.store, rates={"silu": 0.0}, samples=samples, context=16)
    assert given["traffic_per_token"]["spikes"] < traffic["spikes"]


def test_analytic_mode_maps_the_same_synapses_as_the_traced_model(built):
    config = tiny_llama_config().to_dict()
    analytic = map_config(config, timesteps=6, context=16)
    traced = map_loihi2(built.graph, context=16)
    for key in ("synapses", "compartments", "units", "cores"):
        assert analytic[key] == traced[key], key


def test_what_does_not_fit_is_named(built):
    target = load_loihi2()
    small = dataclasses.replace(target, limits={**target.limits, "axons_in_per_core": 32, "accumulator_bits": 12,
                                                "cores_per_chip": 4}, systems={"board": 2})
    report = map_loihi2(built.graph, built.store, target=small, context=16)
    lines = "\n".join(report["does_not_fit"])
    assert "layers.0.mlp.down_proj: fan-in 96 > 32 input axons per core; split into 3 partial sums" in lines
    assert "fixed-point overflow: a synapse sum reaches" in lines and "from the weights" in lines
    assert f"system board: needs {report['chips']} chips > 2" in lines
    worst_case = map_loihi2(built.graph, target=small, context=16)["does_not_fit"]
    assert any("worst case, no weights" in line for line in worst_case)


def test_the_pass_reports_through_the_manager(built, samples):
    _, report = PassManager(["map_loihi2"], options={"map_loihi2": {"context": 16}}).run(
        built.graph, CompileInputs(built.store, samples))
    (entry,) = report
    assert entry["name"] == "map_loihi2" and not entry["modified"] and entry["notes"]["chips"] == 1
    with pytest.raises(SpikecompileError, match="context must be an integer"):
        PassManager(["map_loihi2"], options={"map_loihi2": {"context": 0}})


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_packaged_model_configs_use_hugging_face_fields(name):
    config = model_config(name)
    assert config["source"].startswith("https://huggingface.co/")
    assert all(isinstance(config[field], int) for field in CONFIG_FIELDS)
    assert config["hidden_size"] == config["num_attention_heads"] * config["head_dim"]


def test_llama2_7b_needs_many_chips_and_splits_its_down_proj():
    report = map_config(model_config("llama-2-7b"), timesteps=8)
    assert report["synapses"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000
    assert report["chips"] >= report["chips_by_synapse_count"] == math.ceil(report["synapses"] / 120e6) == 56
    assert not report["systems"]["kapoho_point"]["fits"]
    assert sum("mlp.down_proj: fan-in 11008" in line for line in report["does_not_fit"]) == 32


# ---- the generalised neuron: v0 of any sign and size, a spike budget ------------------------------------------------

def _node(params):
    return PhaseNeuron.from_params("layers.0.silu", params)


def test_budget_counter_bits_and_grid_bits():
    neurons = zoo_neurons(T=6)
    bits = {variant: budget_counter_bits(_node(params)) for variant, params in neurons.items()}
    assert bits == {"spikedattn": 2, "ttfs": 1, "rate": 0, "sdllm": 3, "negative_v0": 2, "large_v0": 0}
    at_t = dataclasses.replace(base2_params(1.0, 4), max_spikes=torch.tensor(4))  # never binds: no counter
    sdllm8 = dataclasses.replace(base2_params(1.0, 8), max_spikes=torch.tensor(7))  # K = 2^(b−1) − 1 at T = 8
    assert budget_counter_bits(_node(at_t)) == 0 and budget_counter_bits(_node(sdllm8)) == 3
    grids = {variant: grid_bits(_node(params)) for variant, params in neurons.items()}
    # the phase coding's ½·τ·2^-T needs T + 1; ½τ', −¼τ' and τ·2^-4 need fewer than T; −0.075τ is no dyadic multiple
    assert grids == {"spikedattn": 7, "ttfs": 7, "rate": 6, "sdllm": 6, "negative_v0": 7, "large_v0": 6}


@pytest.mark.parametrize("variant", ["spikedattn", "sdllm", "negative_v0", "large_v0", "rate"])
def test_potential_level_holds_every_state_the_neuron_reaches(variant):
    """V bounds the residual r_t from both sides, the thresholds, and the all-fire level (v0 < 0 raises it, v0
    above θ(t) makes thresholds negative and lets the residual fall below 0), and F keeps 2^g·V in 24 bits."""
    params = zoo_neurons(T=6)[variant]
    node = _node(params)
    level = potential_level(node)
    _, reset, _, threshold = residual_schedule(node)
    assert level >= np.abs(threshold).max()
    magnitudes = torch.linspace(0, 3 * level, 30001)
    residual, lowest = magnitudes.clone(), 0.0
    for t, spike in enumerate(magnitude_spikes(magnitudes, params)):
        residual = residual - float(reset[t]) * spike
        lowest = min(lowest, float(residual.min()))
    assert -lowest <= level * (1 + 1e-6)
    above = magnitudes[magnitudes >= level]  # at or above V every step fires, up to the budget
    spikes = torch.stack(list(magnitude_spikes(above, params)))
    assert torch.equal(spikes.sum(0), torch.full_like(above, int(params.max_spikes) or params.T))
    exponent = potential_exponent(node, 24, 1)
    assert 2 * level * 2.0 ** exponent / float(params.tau) <= 2 ** 23 - 1 < 2 * level * 2.0 ** (exponent + 1) / float(params.tau)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed_digits"])
@pytest.mark.parametrize("variant", ZOO)
def test_flip_level_is_the_largest_jump_of_the_output(variant, signed):
    """flip_level against brute force: the largest step between neighbours of a dense grid through phase_quantize
    (the grid has no 0, so a jump across x = 0 counts whole); for the unsigned neuron and as a signed-digit one."""
    params = dataclasses.replace(zoo_neurons(T=6)[variant], signed_digits=signed)
    grid = torch.linspace(-1.2, 1.2, 600_000)
    jumps = phase_quantize(grid, params).double().diff().abs()
    # the grid's levels are float32 sums (|x̂| ≤ 1.2: a few ulps of 2^-23 each), flip_level sums in float64
    assert flip_level(_node(params)) == pytest.approx(float(jumps.max()), rel=1e-6, abs=1e-6)


def test_flip_level_of_base2_is_one_lsb_and_k_spikes_widen_it():
    for budget, expected in ((0, 2.0 ** -5), (1, 2.0 ** -2), (2, 2.0 ** -3), (4, 2.0 ** -5)):
        neuron = dataclasses.replace(base2_params(1.0, 5), max_spikes=torch.tensor(budget))
        assert flip_level(_node(neuron)) == expected  # d(K) = τ·2^-(K+1) with a budget K < T


def test_zoo_model_reports_its_budget_counters_and_negative_thresholds(built):
    graph = zoo_graph(built.graph)
    report = map_loihi2(graph, built.store, context=16)
    state = report["neuron_state"]
    sites = [graph[name] for name in graph if isinstance(graph[name], PhaseNeuron)]
    budgeted = [node for node in sites if budget_counter_bits(node)]
    assert state["budget_sites"] == len(budgeted) > 0 and state["counter_bits"] == 3  # sdllm: K = T − 1 = 5
    assert state["negative_threshold_sites"] and all(
        (residual_schedule(graph[name])[3] < 0).any() for name in state["negative_threshold_sites"])
    assert state["potential_bits"] == 24 and set(state["sources"]) == {"potential_bits", "counter_bits"}
    assert report["does_not_fit"] == []
    plain = map_loihi2(built.graph, built.store, context=16)["neuron_state"]
    assert plain["budget_sites"] == plain["counter_bits"] == plain["counter_bits_per_token"] == 0


def test_a_coarse_grid_for_a_fine_v0_is_named(built):
    graph = built.graph.copy()
    name = next(name for name in graph if isinstance(graph[name], PhaseNeuron))
    node = graph[name]
    graph.replace(name, dataclasses.replace(node, v0=node.tau * 2.0 ** -30))
    lines = "\n".join(map_loihi2(graph, built.store, context=16)["does_not_fit"])
    assert f"{name}: fixed point: the 24-bit potential leaves" in lines and "fractional bits < 30" in lines
