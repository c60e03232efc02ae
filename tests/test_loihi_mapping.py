"""The Loihi 2 mapping pass: limits from targets/loihi2.toml, placement of IR graphs (traced from a converted model,
or from a config alone), traffic from measured firing rates, and the diagnostics of what does not fit."""

import dataclasses
import math

import pytest
from conftest import convert_tiny, tiny_llama_config

from spikecompile.build import BuildOptions, build
from spikecompile.errors import SpikecompileError
from spikecompile.ir import Linear, PhaseNeuron
from spikecompile.passes import CompileInputs, PassManager
from spikecompile.passes.loihi_mapping import (
    LIMITS,
    MODEL_CONFIGS,
    load_loihi2,
    map_config,
    map_loihi2,
    model_config,
)

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
