"""spikecompile.summary: the summary of a traced tiny model checked against what its config implies, a hand-built
graph for shared weights and rotations, the text report, and real SVG / PNG drawings of one decoder layer."""

import itertools
import json
from xml.etree import ElementTree

import pytest
import torch
from conftest import build_tiny_llama
from torch import nn

from spikecompile.conversion.convert import SpikingModel
from spikecompile.conversion.sites import install_sites
from spikecompile.errors import SpikecompileError
from spikecompile.frontend import trace
from spikecompile.hadamard import describe_hadamard
from spikecompile.ir import Embedding, Graph, Input, Linear, Output, PhaseNeuron, Rotation, TensorRef
from spikecompile.ir.shapes import bind, per_token
from spikecompile.neuron import base2_params
from spikecompile.passes import PassContext
from spikecompile.passes.timesteps import AssignTimesteps
from spikecompile.summary import draw_layer, format_summary, summarize

T, TAU, GRAINS = 6, 4.0, 2
SITES_PER_LAYER = 9  # attn_norm, q, k, v, attn_probs, o_proj_in, mlp_norm, silu, down_proj_in
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
SVG_TEXT = "{http://www.w3.org/2000/svg}text"


@pytest.fixture(scope="module")
def tiny():
    """(model, site names in model order, traced graph): the tiny LLaMA with base-2 sites (T=6, τ=4, 2 grains)."""
    model = build_tiny_llama()
    sites = install_sites(model)
    params = base2_params(TAU, T, GRAINS)
    record = {"coding": {"timesteps": T}, "rotation": None, "prefix": None,
              "sites": {name: {"tau": params.tau, "genotype": params.genotype, "d": params.d, "h": params.h,
                               "theta": params.theta} for name in sites}}
    for site in sites.values():
        site.neuron = params
    sites.set_mode("decoded")
    graph, _ = trace(SpikingModel(model, None, sites, record))
    return model, list(sites), graph


@pytest.fixture(scope="module")
def summary(tiny):
    return summarize(tiny[2], seq_len=100)


def _shared_weight_graph() -> Graph:
    """ids → embed (weight "embed") → online rotation (int8 signs) → offline rotation → site → lm_head
    (the same weight "embed", tied) → logits."""
    graph = Graph()
    tied = TensorRef("embed", (128, 8))
    signs = torch.tensor([1, -1] * 4, dtype=torch.int8)
    nodes = {
        "input_ids": Input(shape=(1, "seq"), dtype="int64"),
        "embed": Embedding(weight=tied),
        "online": Rotation(n=8, where="online", construction=describe_hadamard(8), signs=signs),
        "offline": Rotation(n=8, where="offline", construction=describe_hadamard(8)),
        "layers.0.attn_norm": PhaseNeuron.from_params("layers.0.attn_norm", base2_params(2.0, 4)),
        "lm_head": Linear(weight=tied),
        "logits": Output(),
    }
    for name, node in nodes.items():
        graph.add_node(name, node)
    names = list(nodes)
    for source, target in itertools.pairwise(names):
        graph.add_edge(source, target)
    return graph


# summarize

def test_counts_follow_the_config(tiny, summary):
    model, _, graph = tiny
    layers = model.config.num_hidden_layers
    assert summary["layers"] == layers and summary["nodes"] == len(graph) and summary["seq_len"] == 100
    types = summary["node_types"]
    assert types["Linear"] == LINEARS_PER_LAYER * layers + 1  # + lm_head
    assert types["PhaseNeuron"] == SITES_PER_LAYER * layers + 1  # + final_norm
    assert types["ActivationMatmul"] == types["RoPE"] == 2 * layers
    assert types["ResidualAdd"] == 2 * layers and types["Nonlinear"] == 4 * layers + 1  # 2 norms, softmax, silu
    assert sum(types.values()) == len(graph)
    assert summary["rotations"] == {"online": 0, "offline": 0}


def test_site_table_lists_every_site_in_model_order(tiny, summary):
    _, site_names, _ = tiny
    assert [row["site"] for row in summary["sites"]] == site_names
    for row in summary["sites"]:
        assert (row["T"], row["genotype"], row["grains"], row["tau"], row["base2"]) == (T, [3, 3], GRAINS, TAU, True)
        expected_layer = None if row["site"] == "final_norm" else int(row["site"].split(".")[1])
        assert row["layer"] == expected_layer and row["site"].endswith(row["kind"])
    assert summary["timesteps"] == [T]
    assert summary["nodes_without_timesteps"] == summary["nodes"] - len(site_names)


def test_linear_synapses_are_the_models_linear_weights(tiny, summary):
    model, _, _ = tiny
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert summary["synapses"]["linear_nodes"] == len(linears)
    assert summary["synapses"]["linear_weights"] == sum(m.in_features * m.out_features for m in linears)


def test_neurons_and_matmul_ops_per_token_follow_the_config(tiny, summary):
    config = tiny[0].config
    hidden, inner, layers, seq = config.hidden_size, config.intermediate_size, config.num_hidden_layers, 100
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    probs = heads * seq  # [heads, S, S] per token: every key of the window
    per_layer = hidden + heads * head_dim + 2 * kv_heads * head_dim + probs + heads * head_dim + hidden + 2 * inner
    assert summary["neurons_per_token"] == {"total": layers * per_layer + hidden, "grows_with_context": layers * probs}
    probs_rows = [row for row in summary["sites"] if row["kind"] == "attn_probs"]
    assert all(row["grows_with_context"] and row["neurons_per_token"] == probs for row in probs_rows)
    qk = pv = layers * heads * seq * head_dim  # qk: [H, S, S] outputs × D; pv: [H, S, D] outputs × S
    assert summary["synapses"]["activation_matmul_ops_per_token"] == {"qk": qk, "pv": pv, "total": qk + pv}
    assert summarize(tiny[2], seq_len=200)["neurons_per_token"]["grows_with_context"] == 2 * layers * probs


def test_parameter_memory_counts_the_weights_and_the_node_tensors(tiny, summary):
    model, site_names, _ = tiny
    config = model.config
    distinct = {t.untyped_storage().data_ptr(): t for t in model.state_dict().values()}  # tied lm_head: once
    weight_bytes = sum(t.numel() * t.element_size() for t in distinct.values())
    neuron_bytes = len(site_names) * (8 * T + 4 + 3 * 4 * GRAINS + 4)  # genotype int64 [T]; τ, d, h, θ, v0 float32
    rope_bytes = 2 * config.num_hidden_layers * 4 * config.head_dim // 2  # inv_freq float32 [head_dim/2] per node
    memory = summary["memory"]
    assert memory["weight_bytes"] == weight_bytes
    assert memory["node_tensor_bytes"] == neuron_bytes + rope_bytes
    assert memory["bytes"] == weight_bytes + neuron_bytes + rope_bytes == sum(memory["by_dtype"].values())
    assert memory["by_dtype"]["int64"] == len(site_names) * 8 * T


def test_summary_is_plain_json(summary):
    assert json.loads(json.dumps(summary)) == summary


def test_weight_referenced_twice_counts_once_and_rotations_are_counted():
    summary = summarize(_shared_weight_graph(), seq_len=10)
    neuron_bytes = 8 * 4 + 4 + 3 * 4 + 4  # genotype int64 [4]; τ, d, h, θ, v0 float32 (1 grain)
    assert summary["memory"]["weight_bytes"] == 128 * 8 * 4
    assert summary["memory"]["by_dtype"] == {"float32": 128 * 8 * 4 + 4 + 3 * 4 + 4, "int64": 8 * 4, "int8": 8}
    assert summary["memory"]["node_tensor_bytes"] == neuron_bytes + 8
    assert summary["synapses"]["linear_weights"] == 128 * 8
    assert summary["rotations"] == {"online": 1, "offline": 1}
    assert summary["layers"] == 1 and summary["sites"][0]["neurons_per_token"] == 8
    assert summary["synapses"]["activation_matmul_ops_per_token"] == {"qk": 0, "pv": 0, "total": 0}


def test_timesteps_after_assign_timesteps(tiny):
    graph = tiny[2]
    assigned = AssignTimesteps().run(graph, PassContext(AssignTimesteps().parse_options({}))).graph
    summary = summarize(assigned)
    assert summary["timesteps"] == [T] and summary["nodes_without_timesteps"] == 0


def test_symbolic_sizes_bind_to_one_window():
    bindings = {"batch": 1, "seq": 50}
    assert [bind(dim, bindings) for dim in (7, "seq", "seq+3", "seq+2+1", "heads")] == [7, 50, 53, 53, None]
    assert per_token(("batch", 4, "seq", "seq+3"), bindings) == 4 * 53
    assert per_token((128, 8), bindings) is None  # no sequence dim: not a per-token quantity
    assert per_token(("beam", "seq", 8), bindings) is None


def test_summarize_refuses_a_bad_seq_len(tiny):
    with pytest.raises(SpikecompileError, match="seq_len must be an int ≥ 1, got 0"):
        summarize(tiny[2], seq_len=0)


# format_summary

def test_format_summary_has_one_line_per_site_and_the_totals(summary):
    text = format_summary(summary)
    lines = text.splitlines()
    for row in summary["sites"]:
        (line,) = [line for line in lines if line.split()[:1] == [row["site"]]]
        assert f"{row['neurons_per_token']:,}" in line and "3+3" in line
    assert f"{summary['synapses']['linear_weights']:,} weights" in text
    assert f"{summary['synapses']['activation_matmul_ops_per_token']['total']:,}" in text
    assert f"{summary['memory']['bytes'] / 2 ** 20:,.2f} MiB" in text
    assert f"spike sites ({len(summary['sites'])})" in text and "timesteps {6}" in text


# draw_layer

def _svg_lines(path) -> list[str]:
    root = ElementTree.parse(path).getroot()
    return ["".join(element.itertext()) for element in root.iter(SVG_TEXT)]


def test_draw_layer_svg_labels_every_node_of_the_layer(tiny, tmp_path):
    graph = tiny[2]
    path = tmp_path / "layer1.svg"
    draw_layer(graph, 1, path)
    lines = _svg_lines(path)
    inside = [name for name in graph if name.startswith("layers.1.")]
    for name in inside:
        assert any(line.endswith(name.rsplit(".", 1)[-1]) for line in lines), name
    assert {"q_proj.heads", "k_proj.heads", "v_proj.heads"} <= set(lines)  # "heads" alone would be ambiguous
    assert "layers.0.mlp_residual" in lines  # the residual stream feeding the layer, named in full
    assert lines.count(f"T={T}") == SITES_PER_LAYER and lines.count("T=?") == len(inside) + 1 - SITES_PER_LAYER
    assert not any(line.startswith("layers.0.") and line != "layers.0.mlp_residual" for line in lines)
    assert any(line.startswith("decoder layer 1:") for line in lines)
    first = path.read_bytes()
    draw_layer(graph, 1, path)
    assert path.read_bytes() == first  # reproducible bytes


def test_draw_layer_png(tiny, tmp_path):
    path = tmp_path / "layer0.png"
    draw_layer(tiny[2], 0, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > width  # a tall, layered drawing
    assert [entry.name for entry in tmp_path.iterdir()] == ["layer0.png"]  # no temporary file left


def test_draw_layer_refuses_a_bad_suffix(tiny, tmp_path):
    path = tmp_path / "layer.jpg"
    with pytest.raises(SpikecompileError, match=r"layer\.jpg: cannot draw to a \.jpg file; use one of \.svg, \.png"):
        draw_layer(tiny[2], 0, path)
    assert not path.exists()


@pytest.mark.parametrize("layer", [2, -1])
def test_draw_layer_refuses_a_layer_out_of_range(tiny, tmp_path, layer):
    with pytest.raises(SpikecompileError, match=rf"no decoder layer {layer}; valid layers: 0\.\.1"):
        draw_layer(tiny[2], layer, tmp_path / "layer.svg")


def test_draw_layer_refuses_a_missing_directory(tiny, tmp_path):
    with pytest.raises(SpikecompileError, match="does not exist"):
        draw_layer(tiny[2], 0, tmp_path / "absent" / "layer.svg")


def test_draw_layer_on_a_graph_without_layers_says_so(tmp_path):
    graph = Graph()
    graph.add_node("x", Input(shape=("seq", 4), dtype="float32"))
    graph.add_node("out", Output())
    graph.add_edge("x", "out")
    with pytest.raises(SpikecompileError, match=r"no decoder layer 0; valid layers: none \(the graph has no nodes"):
        draw_layer(graph, 0, tmp_path / "layer.svg")
