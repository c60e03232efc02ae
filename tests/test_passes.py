"""The first IR passes, assign_timesteps and cleanup, on a traced tiny model and on small hand-built graphs."""

import pytest
import torch
from conftest import build_tiny_llama

from spikecompile.conversion.convert import SpikingModel
from spikecompile.conversion.sites import install_sites
from spikecompile.errors import SpikecompileError
from spikecompile.frontend import trace
from spikecompile.hadamard import describe_hadamard
from spikecompile.ir import (
    Embedding, Graph, Input, Linear, Nonlinear, Output, PhaseNeuron, ResidualAdd, Rotation, TensorRef, interpret,
    retyped, validate,
)
from spikecompile.neuron import base2_params
from spikecompile.passes import PassContext, PassManager
from spikecompile.passes.cleanup import Cleanup, dead_nodes, is_identity, is_inverse_pair
from spikecompile.passes.timesteps import AssignTimesteps

FITTED_T = 6


def _ids(length=12, seed=0):
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def traced():
    """The tiny LLaMA with every site a base-2 neuron (T=6, τ=4, 2 grains), traced: no conversion needed."""
    model = build_tiny_llama()
    sites = install_sites(model)
    params = base2_params(4.0, FITTED_T, 2)
    record = {"coding": {"timesteps": FITTED_T}, "rotation": None, "prefix": None,
              "sites": {name: {"tau": params.tau, "genotype": params.genotype, "d": params.d, "h": params.h,
                               "theta": params.theta} for name in sites}}
    for site in sites.values():
        site.neuron = params
    sites.set_mode("decoded")
    return trace(SpikingModel(model, None, sites, record))


def _run(pass_, graph, **options):
    return pass_.run(graph, PassContext(pass_.parse_options(options)))


def _small(neuron=None):
    """input_ids → embed → rmsnorm → site layers.0.attn_norm → proj → logits, with its tensor store."""
    graph = Graph()
    graph.add_node("input_ids", Input(shape=(1, "seq"), dtype="int64"))
    graph.add_node("embed", Embedding(weight=TensorRef("embed", (128, 8))))
    graph.add_node("norm", Nonlinear(function="rmsnorm", eps=1e-5))
    graph.add_node("layers.0.attn_norm", neuron or PhaseNeuron.from_params("layers.0.attn_norm", base2_params(3.0, 6)))
    graph.add_node("proj", Linear(weight=TensorRef("proj", (128, 8))))
    graph.add_node("logits", Output())
    for source, target in [("input_ids", "embed"), ("embed", "norm"), ("norm", "layers.0.attn_norm"),
                           ("layers.0.attn_norm", "proj"), ("proj", "logits")]:
        graph.add_edge(source, target)
    generator = torch.Generator().manual_seed(0)
    store = {"embed": torch.randn(128, 8, generator=generator), "proj": torch.randn(128, 8, generator=generator)}
    return graph, store


# assign_timesteps

def test_every_node_gets_the_fitted_timesteps(traced):
    graph, _ = traced
    result = _run(AssignTimesteps(), graph)
    assert {result.graph[name].timesteps for name in result.graph} == {FITTED_T}
    assert all(graph[name].timesteps is None for name in graph if not isinstance(graph[name], PhaseNeuron))
    AssignTimesteps().ensures(result.graph)
    assert result.modified and result.notes["sites_changed"] == []


def test_overrides_re_derive_base2_sites_and_propagate(traced):
    graph, store = traced
    sites = {"layers.1.silu": 10, "layers.1.mlp_norm": 10}  # they meet at the MLP product: one T
    result = _run(AssignTimesteps(), graph, sites=sites)
    new = result.graph
    validate(new)
    assert new["layers.1.silu"].timesteps == 10 and new["layers.1.mlp.product"].timesteps == 10
    assert new["layers.1.mlp.up_proj"].timesteps == 10 and new["layers.1.down_proj_in"].timesteps == FITTED_T
    assert new["layers.1.mlp.gate_proj"].timesteps == 10  # fed by the mlp_norm site
    assert new["layers.1.mlp_residual"].timesteps == FITTED_T  # the residual stream, fed by down_proj_in
    assert torch.equal(new["layers.1.silu"].tau, graph["layers.1.silu"].tau)
    assert result.notes["sites_changed"] == ["layers.1.mlp_norm", "layers.1.silu"]
    ids = _ids()
    assert not torch.equal(interpret(new, store, ids), interpret(graph, store, ids))  # finer steps at two sites


def test_global_timesteps_option(traced):
    graph, _ = traced
    result = _run(AssignTimesteps(), graph, timesteps=8)
    assert {result.graph[name].timesteps for name in result.graph} == {8}


def test_sites_that_meet_must_agree(traced):
    graph, _ = traced
    with pytest.raises(SpikecompileError, match=r"layers\.1\.silu \(T=10\).*meet at layers\.1\.mlp\.product"):
        _run(AssignTimesteps(), graph, sites={"layers.1.silu": 10})


def test_unknown_site_names_it_and_suggests(traced):
    graph, _ = traced
    with pytest.raises(SpikecompileError) as error:
        _run(AssignTimesteps(), graph, sites={"layers.1.slu": 8})
    text = str(error.value)
    assert "layers.1.slu" in text and "did you mean layers.1.silu" in text and "\n" not in text


@pytest.mark.parametrize("raw", [{"sites": {"layers.0.q": 20}}, {"sites": ["layers.0.q=3"]}, {"timesteps": 17},
                                 {"sites": {"layers.0.q": True}}])
def test_out_of_range_timesteps_are_refused(raw):
    with pytest.raises(SpikecompileError, match=r"pass assign_timesteps option .*outside 4\.\.16"):
        AssignTimesteps().parse_options(raw)


def test_overrides_from_cli_strings_and_toml(tmp_path):
    assert AssignTimesteps().parse_options({"sites": ["layers.3.silu=10", " final_norm = 12 "]}) == \
        {"sites": {"layers.3.silu": 10, "final_norm": 12}}
    path = tmp_path / "timesteps.toml"
    path.write_text('[sites]\n"layers.3.silu" = 10\nfinal_norm = 12\n')
    assert AssignTimesteps().parse_options({"sites": path}) == {"sites": {"layers.3.silu": 10, "final_norm": 12}}
    path.write_text('sites = 3\n')
    with pytest.raises(SpikecompileError, match=r"expected one \[sites\] table"):
        AssignTimesteps().parse_options({"sites": str(path)})
    with pytest.raises(SpikecompileError, match="not of the form SITE=T"):
        AssignTimesteps().parse_options({"sites": ["layers.3.silu"]})


def test_fitted_phase_neuron_refuses_another_timestep_count():
    fitted, _ = PhaseNeuron.example()  # bases 2.0/1.9 …: fitted at T=4
    neuron = PhaseNeuron.from_params("layers.0.attn_norm", fitted.params())
    graph, _ = _small(neuron)
    assert _run(AssignTimesteps(), graph, sites={"layers.0.attn_norm": 4}).graph["proj"].timesteps == 4
    with pytest.raises(SpikecompileError, match=r"site layers\.0\.attn_norm: .*fitted at T=4 .*-T 8"):
        _run(AssignTimesteps(), graph, sites={"layers.0.attn_norm": 8})


def test_small_graph_timesteps_cross_the_neuron():
    graph, store = _small()
    result = _run(AssignTimesteps(), graph, sites={"layers.0.attn_norm": 9}, timesteps=5)
    steps = {name: result.graph[name].timesteps for name in result.graph}
    # before the neuron: the global T (no site feeds that part); the neuron and after it: its own T
    assert steps == {"input_ids": 5, "embed": 5, "norm": 5, "layers.0.attn_norm": 9, "proj": 9, "logits": 9}
    validate(result.graph)
    assert interpret(result.graph, store, _ids(5)).shape == (1, 5, 128)


# cleanup

def _plant_dead_branch_and_identity(graph: Graph) -> Graph:
    planted = graph.copy()
    planted.add_node("dead.silu", Nonlinear(function="silu"))
    planted.add_edge("layers.1.attn_residual", "dead.silu")
    planted.add_node("dead.proj", Linear(weight=graph["layers.1.mlp.up_proj"].weight))
    planted.add_edge("dead.silu", "dead.proj")
    signs = torch.tensor([1, -1] * 32, dtype=torch.int8)
    planted.add_node("layers.0.basis", Rotation(n=64, where="offline", construction=describe_hadamard(64), signs=signs))
    planted.add_node("layers.0.basis_back", Rotation(n=64, where="online", construction=describe_hadamard(64),
                                                     signs=signs, transpose=True))
    planted.add_node("layers.0.unit", Rotation(n=1, where="online", construction=describe_hadamard(1)))
    consumers = planted.out_edges("layers.0.attn_residual")
    for _, consumer, port in consumers:
        planted.remove_edge("layers.0.attn_residual", consumer)
        planted.add_edge("layers.0.unit", consumer, port)
    for source, target in [("layers.0.attn_residual", "layers.0.basis"), ("layers.0.basis", "layers.0.basis_back"),
                           ("layers.0.basis_back", "layers.0.unit")]:
        planted.add_edge(source, target)
    validate(planted)
    return planted


def test_cleanup_removes_dead_branch_and_identity_bitwise(traced):
    graph, store = traced
    planted = _plant_dead_branch_and_identity(graph)
    assert dead_nodes(planted) == {"dead.silu", "dead.proj"}
    result = _run(Cleanup(), planted)
    Cleanup().ensures(result.graph)
    assert result.modified and result.notes == {"dead_removed": 2, "identity_removed": 3, "identity_kept": []}
    assert set(result.graph) == set(graph) and sorted(result.graph.edges()) == sorted(graph.edges())
    ids = _ids()
    # x·Q·Qᵀ = x, in float64: in float32 its rounding flips spikes that sit on a threshold (differently on each CPU)
    torch.testing.assert_close(interpret(*retyped(planted, store, torch.float64), ids),
                               interpret(*retyped(graph, store, torch.float64), ids))
    assert torch.equal(interpret(result.graph, store, ids), interpret(graph, store, ids))


def test_a_rotation_and_a_different_one_are_not_a_pair():
    construction = describe_hadamard(4)
    plain = Rotation(n=4, where="offline", construction=construction)
    signed = Rotation(n=4, where="offline", construction=construction, signs=torch.tensor([1, -1, 1, 1], dtype=torch.int8),
                      transpose=True)
    assert not is_inverse_pair(plain, signed) and not is_inverse_pair(plain, plain)
    assert is_inverse_pair(plain, Rotation(n=4, where="online", construction=construction, transpose=True))
    assert not is_identity(plain) and is_identity(Rotation(n=1, where="offline", construction=describe_hadamard(1)))


def test_cleanup_on_a_clean_graph_changes_nothing(traced):
    graph, _ = traced
    result = _run(Cleanup(), graph)
    assert not result.modified and sorted(result.graph.edges()) == sorted(graph.edges())


def test_identity_kept_when_its_producer_already_feeds_the_consumer():
    graph = Graph()
    graph.add_node("x", Input(shape=("seq", 4), dtype="float32"))
    graph.add_node("basis", Rotation(n=4, where="offline", construction=describe_hadamard(4)))
    graph.add_node("basis_back", Rotation(n=4, where="offline", construction=describe_hadamard(4), transpose=True))
    graph.add_node("add", ResidualAdd())
    graph.add_node("out", Output())
    graph.add_edge("x", "basis")
    graph.add_edge("basis", "basis_back")
    graph.add_edge("basis_back", "add", "branch")
    graph.add_edge("x", "add", "residual")
    graph.add_edge("add", "out")
    result = _run(Cleanup(), graph)
    assert not result.modified and result.notes["identity_kept"] == ["basis"]


def test_cleanup_needs_an_output():
    graph = Graph()
    graph.add_node("x", Input(shape=("seq",), dtype="int64"))
    with pytest.raises(SpikecompileError, match="in pass cleanup, after \\[\\]: requires failed: .*no Output"):
        PassManager(["cleanup"]).run(graph)


# both passes through the manager

def test_pipeline_runs_cleanup_first_and_can_disable_it(traced):
    graph, store = traced
    planted = _plant_dead_branch_and_identity(graph)
    options = {"assign_timesteps": {"sites": ["layers.0.q=8", "layers.0.k=8"]}}
    manager = PassManager(["assign_timesteps", "cleanup"], invariants=[validate], options=options)
    assert [pass_.name for pass_ in manager.order] == ["cleanup", "assign_timesteps"]
    cleaned, report = manager.run(planted)
    assert [entry["name"] for entry in report] == ["cleanup", "assign_timesteps"]
    assert report[0]["notes"]["dead_removed"] == 2 and "dead.silu" not in cleaned
    assert cleaned["layers.0.self_attn.scores"].timesteps == 8
    assert all(cleaned[name].timesteps is not None for name in cleaned)

    kept, report = PassManager(["assign_timesteps", "cleanup"], invariants=[validate], options=options,
                               disabled=["cleanup"]).run(planted)
    assert report[0]["skipped"] and not report[1]["skipped"]
    assert "dead.silu" in kept and kept["dead.silu"].timesteps == FITTED_T
    ids = _ids()
    assert torch.equal(interpret(kept, store, ids), interpret(cleaned, store, ids))
