"""The frontend: trace a converted model into the IR and interpret it; the result must be the model's logits."""

import collections

import pytest
import torch
from conftest import build_tiny_llama, convert_tiny, requires_smollm2

from spikecompile.conversion.convert import SpikingModel, load_spiking_model
from spikecompile.conversion.sites import install_sites
from spikecompile.errors import SpikecompileError
from spikecompile.frontend import trace
from spikecompile.ir import PhaseNeuron, interpret, read, sites_off, validate, write
from spikecompile.neuron import base2_params

VARIANTS = {"plain": ["--rotate", "none", "--prefix", "none"],
            "rotated": ["--rotate", "hadamard", "--prefix", "none"],
            "rotated+prefix": ["--rotate", "hadamard", "--prefix", "auto"]}
SITES_OFF = {PhaseNeuron: sites_off}


def _ids(length=32, seed=0):
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _assert_close(got, expected):
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny model converted through the CLI once per variant (T=6, 2 grains)."""
    root = tmp_path_factory.mktemp("frontend")
    return {name: convert_tiny(root, name, *options) for name, options in VARIANTS.items()}


@pytest.fixture(scope="module", params=list(VARIANTS))
def traced(request, converted):
    spiking = load_spiking_model(str(converted[request.param]))
    graph, store = trace(spiking)
    return request.param, spiking, graph, store


def test_interpreted_graph_gives_the_spiking_logits(traced):
    _, spiking, graph, store = traced
    for length, seed in ((32, 0), (7, 1)):
        ids = _ids(length, seed)
        with torch.no_grad():
            expected = spiking.logits(ids)
        _assert_close(interpret(graph, store, ids), expected)


def test_with_every_site_off_the_graph_is_the_float_model(traced):
    _, spiking, graph, store = traced
    ids = _ids()
    with torch.no_grad(), spiking.sites.all_off():
        # the float model after the same prefix (ann_logits itself runs without one)
        expected = spiking.logits(ids) if spiking.prefix else spiking.ann_logits(ids)
    _assert_close(interpret(graph, store, ids, overrides=SITES_OFF), expected)


def test_node_counts_follow_the_architecture(traced):
    name, spiking, graph, _ = traced
    layers = spiking.model.config.num_hidden_layers
    rotated, prefixed = "rotated" in name, "prefix" in name
    per_layer = {"PhaseNeuron": 9, "Linear": 7, "Nonlinear": 4, "SplitHeads": 3, "RoPE": 2, "ActivationMatmul": 2,
                 "ResidualAdd": 2, "MergeHeads": 1, "ElementwiseProduct": 1}
    per_layer |= {"Rotation": 1} if rotated else {}
    per_layer |= {"KVPrefix": 2} if prefixed else {}
    for index in range(layers):
        layer = graph.subgraph(f"layers.{index}.")
        assert collections.Counter(type(layer[node]).__name__ for node in layer) == per_layer
    whole = collections.Counter(type(graph[node]).__name__ for node in graph)
    assert whole["PhaseNeuron"] == 9 * layers + 1 == len(spiking.sites)
    assert {"Input": 1, "Embedding": 1, "Output": 1} == {kind: whole[kind] for kind in ("Input", "Embedding", "Output")}
    assert whole["Linear"] == 7 * layers + 1 and whole["Nonlinear"] == 4 * layers + 1


def test_graph_names_sites_weights_and_prefix(traced):
    name, spiking, graph, store = traced
    assert {node for node in graph if isinstance(graph[node], PhaseNeuron)} == set(spiking.sites)
    q_proj = graph["layers.1.self_attn.q_proj"]
    assert q_proj.weight.name == "model.layers.1.self_attn.q_proj.weight"
    # the store holds the model's own tensors, not copies
    assert store[q_proj.weight.name].data_ptr() == spiking.model.model.layers[1].self_attn.q_proj.weight.data_ptr()
    offset = graph["layers.0.self_attn.q_rope"].position_offset
    assert offset == (len(spiking.record["prefix"]["token_ids"]) if "prefix" in name else 0)
    assert graph["layers.0.self_attn.scores"].groups == 2  # 4 query heads share 2 KV heads
    if "rotated" in name:
        rotation = graph["layers.0.mlp.online_hadamard"]
        assert rotation.where == "online" and rotation.n == 96
        assert graph.consumers("layers.0.mlp.online_hadamard") == ["layers.0.down_proj_in"]


def test_graph_round_trips_through_the_ir_format(traced, tmp_path):
    _, _, graph, store = traced
    validate(graph)
    write(graph, tmp_path / "graph")
    again = read(tmp_path / "graph")
    assert list(again) == list(graph) and sorted(again.edges()) == sorted(graph.edges())
    ids = _ids(16)
    assert torch.equal(interpret(again, store, ids), interpret(graph, store, ids))


def _spiking_with_base2_sites(model) -> SpikingModel:
    """A SpikingModel without conversion: every site a base-2 neuron (T=4, τ=4), decoded."""
    sites = install_sites(model)
    params = base2_params(4.0, 4, 2)
    record = {"coding": {"timesteps": 4}, "rotation": None, "prefix": None,
              "sites": {name: {"tau": params.tau, "genotype": params.genotype, "d": params.d, "h": params.h,
                               "theta": params.theta} for name in sites}}
    for site in sites.values():
        site.neuron = params
    sites.set_mode("decoded")
    return SpikingModel(model, None, sites, record)


def test_attention_and_mlp_biases_are_traced():
    spiking = _spiking_with_base2_sites(build_tiny_llama(attention_bias=True, mlp_bias=True))
    graph, store = trace(spiking)
    assert graph["layers.0.mlp.down_proj"].bias.name == "model.layers.0.mlp.down_proj.bias"
    ids = _ids()
    with torch.no_grad():
        expected = spiking.logits(ids)
    _assert_close(interpret(graph, store, ids), expected)


def _add_q_norm(model):
    model.model.layers[1].self_attn.q_norm = torch.nn.Identity()
    return model


@pytest.mark.parametrize("build, message", [
    (lambda: build_tiny_llama(hidden_act="gelu"), "model.layers.0.mlp.act_fn: activation 'gelu'"),
    (lambda: build_tiny_llama(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
     "model.rotary_emb: rope type 'dynamic'"),
    (lambda: _add_q_norm(build_tiny_llama()), "model.layers.1.self_attn.q_norm: unexpected module Identity"),
])
def test_unsupported_modules_give_a_one_line_error(build, message):
    with pytest.raises(SpikecompileError) as error:
        trace(_spiking_with_base2_sites(build()))
    text = str(error.value)
    assert message in text and "\n" not in text


@pytest.mark.slow
@requires_smollm2
def test_smollm2_graph_gives_the_spiking_logits(smollm2_t8_path):
    from spikecompile.data import load_text, token_windows

    spiking = load_spiking_model(str(smollm2_t8_path))
    graph, store = trace(spiking)
    assert sum(isinstance(graph[node], PhaseNeuron) for node in graph) == 30 * 9 + 1
    (ids,) = token_windows(spiking.tokenizer, load_text("builtin", "eval"), 512, 1, "evaluation")
    with torch.no_grad():
        expected = spiking.logits(ids)
    _assert_close(interpret(graph, store, ids), expected)


def test_a_decoder_block_runs_on_its_own(traced):
    from spikecompile.ir import evaluate
    from spikecompile.ir import decoder_block

    _, spiking, graph, store = traced
    ids = _ids()
    values = evaluate(graph, store, ids)
    for which, norm, branch in [("attn", "layers.1.input_layernorm", "layers.1.attn_residual"),
                                ("mlp", "layers.1.post_attention_layernorm", "layers.1.mlp_residual")]:
        block = decoder_block(graph, 1, which)
        assert "layers.1.mlp.down_proj" in block if which == "mlp" else "layers.1.self_attn.o_proj" in block
        assert not [name for name in block if name.endswith("residual")]
        entering = values[graph.inputs(norm)["x"]]
        expected = values[graph.inputs(branch)["branch"]]
        assert torch.equal(interpret(block, store, {"block_input": entering}), expected)
    with pytest.raises(SpikecompileError, match="block mlp of layer 7: not in the graph"):
        decoder_block(graph, 7, "mlp")
