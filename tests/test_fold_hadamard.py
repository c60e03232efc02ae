"""fold_hadamard: a model traced with its rotations explicit, folded, computes what the converted model computes."""

import pytest
import torch
from conftest import assert_same_neurons, convert_tiny

from spikecompile.conversion.convert import load_spiking_model
from spikecompile.errors import SpikecompileError
from spikecompile.frontend import trace
from spikecompile.hadamard import describe_hadamard
from spikecompile.ir import (
    Embedding, Graph, Input, Linear, Nonlinear, Output, PhaseNeuron, Rotation, TensorRef, interpret, retyped,
    sites_off,
)
from spikecompile.passes import CompileInputs, PassContext, PassManager
from spikecompile.passes.fold_hadamard import FoldHadamard

SITES_OFF = {PhaseNeuron: sites_off}


def _ids(length=24, seed=0):
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _relative_error(got, expected):
    return float((got - expected).detach().abs().max() / expected.detach().abs().max())


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return convert_tiny(tmp_path_factory.mktemp("fold"), "tiny", "--rotate", "hadamard", "--prefix", "auto")


@pytest.fixture(scope="module")
def explicit(model_file):
    spiking = load_spiking_model(str(model_file), rotations="explicit")
    return spiking, *trace(spiking)


def test_explicit_trace_has_every_offline_rotation_and_runs_like_the_model(model_file, explicit):
    spiking, graph, store = explicit
    layers = spiking.model.config.num_hidden_layers
    offline = [name for name in graph if isinstance(graph[name], Rotation) and graph[name].where == "offline"]
    assert len(offline) == 2 + 7 * layers  # embed, lm_head; per layer q/k/v in, v out, o in/out, mlp in, down in/out
    assert graph["layers.0.self_attn.v_proj.output_rotation"].n == spiking.model.config.head_dim
    with pytest.raises(SpikecompileError, match="rotations left out"):
        spiking.logits(_ids())
    applied = load_spiking_model(str(model_file))
    ids = _ids()
    # sites off: the explicit graph is the converted model's float function (prefix cache included)
    assert _relative_error(interpret(graph, store, ids, SITES_OFF), interpret(*trace(applied), ids, SITES_OFF)) < 1e-4


def test_folding_removes_offline_rotations_and_keeps_the_logits(model_file, explicit):
    spiking, graph, store = explicit
    folded, report = PassManager(["fold_hadamard"]).run(graph, CompileInputs(store))
    assert not [name for name in folded if isinstance(folded[name], Rotation) and folded[name].where == "offline"]
    assert [name for name in folded if isinstance(folded[name], Rotation)] == \
        [f"layers.{i}.mlp.online_hadamard" for i in range(spiking.model.config.num_hidden_layers)]
    notes = report[0]["notes"]
    assert notes["made_online"] == [] and notes["folded_into_producer"] + notes["folded_into_consumers"] == \
        len(graph) - len(folded)
    assert folded["layers.0.mlp.down_proj"].weight.name == "folded.layers.0.mlp.down_proj.weight"
    ids = _ids()
    # sites off in float32; sites on in float64 (as tests/test_smollm2.py: in float32 the folded weights' rounding
    # flips spikes that sit on a threshold, differently on each CPU, and a flip moves the logits a whole step)
    assert _relative_error(interpret(folded, store, ids, SITES_OFF), interpret(graph, store, ids, SITES_OFF)) < 1e-4
    graph64, store64 = retyped(graph, store, torch.float64)
    folded64, _ = PassManager(["fold_hadamard"]).run(graph64, CompileInputs(store64))
    assert sorted(folded64) == sorted(folded)
    assert _relative_error(interpret(folded64, store64, ids), interpret(graph64, store64, ids)) < 1e-4
    # and the folded graph is the converted model itself: its float function (sites off) and its neurons
    applied = load_spiking_model(str(model_file))
    with torch.no_grad(), applied.sites.all_off():
        expected = applied.logits(ids)
    assert _relative_error(interpret(folded, store, ids, SITES_OFF), expected) < 1e-4
    assert_same_neurons(folded, applied.sites)
    assert torch.allclose(store["folded.layers.1.mlp.down_proj.weight"],
                          applied.model.model.layers[1].mlp.down_proj.weight, atol=1e-6)


def test_folding_leaves_the_input_graph_and_its_tensors_alone(explicit):
    _, graph, store = explicit
    before = {key: tensor.clone() for key, tensor in store.items() if not key.startswith("folded.")}
    nodes = len(graph)
    PassManager(["fold_hadamard"]).run(graph, CompileInputs(store))
    assert len(graph) == nodes
    assert all(torch.equal(store[key], tensor) for key, tensor in before.items())


def _chain(rotation_after: str):
    """embed → (rotation) → silu → (rotation) → proj → logits, with its store."""
    graph = Graph()
    rotation = Rotation(n=4, where="offline", construction=describe_hadamard(4),
                        signs=torch.tensor([1, -1, 1, -1], dtype=torch.int8))
    graph.add_node("ids", Input(shape=(1, "seq"), dtype="int64"))
    graph.add_node("embed", Embedding(weight=TensorRef("embed", (16, 8))))
    graph.add_node("silu", Nonlinear(function="silu"))
    graph.add_node("rotation", rotation)
    graph.add_node("proj", Linear(weight=TensorRef("proj", (16, 8)), bias=TensorRef("bias", (16,))))
    graph.add_node("logits", Output())
    order = {"embed": ["ids", "embed", "rotation", "silu", "proj", "logits"],
             "silu": ["ids", "embed", "silu", "rotation", "proj", "logits"]}[rotation_after]
    for source, target in zip(order, order[1:]):
        graph.add_edge(source, target)
    generator = torch.Generator().manual_seed(0)
    store = {name: torch.randn(*shape, generator=generator) for name, shape in
             [("embed", (16, 8)), ("proj", (16, 8)), ("bias", (16,))]}
    return graph, store


@pytest.mark.parametrize("where", ["embed", "silu"])
def test_hand_built_folds_into_producer_or_consumer(where):
    graph, store = _chain(where)
    result = FoldHadamard().run(graph, PassContext({}, CompileInputs(store)))
    assert "rotation" not in result.graph
    folded = "embed" if where == "embed" else "proj"
    assert result.graph[folded].weight.name == f"folded.{folded}.weight"
    ids = torch.tensor([[1, 5, 7, 2]])
    torch.testing.assert_close(interpret(result.graph, store, ids), interpret(graph, store, ids))


def test_a_rotation_between_nonlinear_nodes_becomes_online():
    graph, store = _chain("silu")
    graph.add_node("silu2", Nonlinear(function="silu"))
    graph.remove_edge("rotation", "proj")
    graph.add_edge("rotation", "silu2")
    graph.add_edge("silu2", "proj")
    graph.remove_edge("embed", "silu")
    graph.add_node("silu0", Nonlinear(function="silu"))
    graph.add_edge("embed", "silu0")
    graph.add_edge("silu0", "silu")
    result = FoldHadamard().run(graph, PassContext({}, CompileInputs(store)))
    assert result.notes["made_online"] == ["rotation"] and result.graph["rotation"].where == "online"
    ids = torch.tensor([[1, 5, 7, 2]])
    torch.testing.assert_close(interpret(result.graph, store, ids), interpret(graph, store, ids))


def test_needs_the_store():
    graph, _ = _chain("embed")
    with pytest.raises(SpikecompileError, match="in pass fold_hadamard, .*needs the tensor store"):
        PassManager(["fold_hadamard"]).run(graph)


def test_releasing_replaced_weights_keeps_the_folded_bits_and_drops_the_originals(model_file):
    """A build's store (release_replaced): the same folded tensors, bit for bit, and no tensor left that the folded
    graph does not reference, so a big model's weights are never held twice."""
    from spikecompile.ir import tensor_refs

    folded = {}
    for release in (False, True):
        graph, store = trace(load_spiking_model(str(model_file), rotations="explicit"))
        before = dict(store)
        result, _ = PassManager(["fold_hadamard"]).run(graph, CompileInputs(store, release_replaced=release))
        referenced = set(tensor_refs(result))
        folded[release] = {key: store[key] for key in referenced}
        if release:
            assert set(store) == referenced
            assert any(key not in store for key in before)  # the unrotated originals left the store
        else:
            assert set(before) <= set(store) and set(store) - referenced
    assert folded[False].keys() == folded[True].keys()
    assert all(torch.equal(folded[False][key], folded[True][key]) for key in folded[False])


def test_folding_by_blocks_of_rows_is_folding_whole(explicit):
    """Blocks of a few rows (each whole group of n rows for a Linear's output rotation) give the whole-matrix fold's
    tensors bit for bit."""
    from spikecompile.passes import fold_hadamard

    _, graph, store = explicit
    results = {}
    for block_bytes in (1 << 40, 1):  # one block; the smallest blocks the rule allows
        weights = fold_hadamard._Weights(graph.copy(), dict(store), block_bytes=block_bytes)
        for name in fold_hadamard._offline(graph):
            (producer,) = graph.inputs(name).values()
            if isinstance(graph[producer], fold_hadamard.SYNAPSES) and len(graph.consumers(producer)) == 1:
                weights.rotate_output(producer, graph[name])
            else:
                for consumer in graph.consumers(name):
                    weights.rotate_input(consumer, graph[name])
        results[block_bytes] = {name: weights._rotated(weights.graph[name], steps)
                                for name, steps in weights.pending.items()}
    whole, blocked = results.values()
    assert whole.keys() == blocked.keys() and len(whole) > 5
    for name in whole:
        for field in whole[name]:
            assert torch.equal(whole[name][field], blocked[name][field]), (name, field)


@pytest.mark.parametrize("dense_up_to", [128, 2])
def test_factored_rotation_is_the_dense_product(dense_up_to, monkeypatch):
    """Both factored products (the fold's and ir.linear.rotate_by_factors, the fixed-point run's) with
    Rotation.factors, and factors(transposed=True), equal x·M and x·Mᵀ with M = Rotation.matrix(), for sizes with a
    non-power-of-two factor, with and without signs; the fold's Sylvester factor applied densely (up to
    DENSE_SYLVESTER) or by its own Kronecker factors (above it: dense_up_to=2 makes every size take that path)."""
    from spikecompile.ir.linear import rotate_by_factors
    from spikecompile.passes import fold_hadamard
    from spikecompile.passes.fold_hadamard import _times

    monkeypatch.setattr(fold_hadamard, "DENSE_SYLVESTER", dense_up_to)
    generator = torch.Generator().manual_seed(0)
    for n in (8, 12, 24, 40, 256, 768):
        signs = torch.where(torch.rand(n, generator=generator) < 0.5, -1, 1).to(torch.int8)
        for transpose in (False, True):
            for sign in (None, signs):
                rotation = Rotation(n=n, where="offline", construction=describe_hadamard(n), signs=sign,
                                    transpose=transpose)
                x = torch.randn(5, 3 * n, generator=generator, dtype=torch.float64)
                m = rotation.matrix()
                for transposed, dense in ((False, m), (True, m.T)):
                    expected = (x.reshape(5, 3, n) @ dense).reshape(x.shape)
                    for product in (_times, rotate_by_factors):
                        torch.testing.assert_close(product(x, rotation.factors(transposed=transposed)), expected,
                                                   rtol=1e-12, atol=1e-12)


def test_wide_sylvester_factors_fold_like_the_dense_product():
    """At LLaMA widths (4096 = one 4096-wide Sylvester factor) the fold applies it as 64·64 factors: the same
    product as the dense one to float64 rounding."""
    from spikecompile.passes.fold_hadamard import DENSE_SYLVESTER, _times

    n = 4096
    assert n > DENSE_SYLVESTER
    signs = torch.where(torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.5, -1, 1).to(torch.int8)
    rotation = Rotation(n=n, where="offline", construction=describe_hadamard(n), signs=signs)
    x = torch.randn(6, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for transposed, dense in ((False, rotation.matrix()), (True, rotation.matrix().T)):
        torch.testing.assert_close(_times(x, rotation.factors(transposed=transposed)), x @ dense, rtol=1e-12,
                                   atol=1e-12)
