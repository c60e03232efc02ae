"""The ONNX backend: valid models (onnx.checker), run by onnxruntime, equal to the reference simulator — within float
tolerance on the tiny model, bit for bit (spike planes included) with dyadic weights — with dynamic batch and
sequence axes, the KV prefix as an input, every IR node type lowered, and clear errors; the tiny model converted
with --coding phase and with phase-sd (signed-digit neurons, int8 spike planes)."""

import dataclasses
import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import convert_tiny, requires_smollm2
from test_budget_lowering import zoo_graph, zoo_neurons
from test_sdllm_per_token import per_token_built

EXTRA = "needs the onnx extra: pip install 'spikecompile[onnx]'"
onnx = pytest.importorskip("onnx", reason=EXTRA)
pytest.importorskip("onnxruntime", reason=EXTRA)

from spikecompile.backends.onnx import (
    LOWERINGS, OPSET, agreement, build_onnx, check_form, export, run, session, teacher_forced, to_onnx,
)
from spikecompile.backends.sim import simulate
from spikecompile.backends.sim.simulate import output_of, run as simulate_run
from spikecompile.build import BuildOptions, build
from spikecompile.conversion.codings import sdllm_per_token, sdllm_unit
from spikecompile.errors import SpikecompileError
from spikecompile.hadamard import describe_hadamard
from spikecompile.ir import (
    NODE_TYPES, ActivationMatmul, ElementwiseProduct, Embedding, Graph, Input, KVPrefix, Linear, MergeHeads, Output,
    PhaseNeuron, ResidualAdd, Rotation, SplitHeads, TensorRef, tensor_refs, validate,
)
from spikecompile.neuron import (
    PhaseNeuronParams, base2_params, phase_encode, phase_quantize, signed_base2_params, step_schedule,
)

export_module = importlib.import_module("spikecompile.backends.onnx.export")  # the package's `export` is the function
TOLERANCE = 1e-5
"""ORT logits vs the simulator's, relative to the largest logit (measured: 0 on the tiny model, float32)."""


def _ids(batch=1, length=20, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _relative_error(got, expected):
    got = torch.as_tensor(got)
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.fixture(scope="module")
def phase_built(tmp_path_factory):
    """The tiny model converted (T=6, 2 grains, Hadamard rotation, KV prefix) and built."""
    return build(convert_tiny(tmp_path_factory.mktemp("onnx")), BuildOptions())


@pytest.fixture(scope="module", params=["phase", "phase-sd", "sdllm-per-token"])
def built(request, phase_built, tmp_path_factory):
    """The tiny model converted with --coding phase, with phase-sd (signed-digit neurons), or with sdllm's per-token
    scales (a run-time max and divide at every site), and built."""
    if request.param == "phase":
        return phase_built
    if request.param == "sdllm-per-token":
        return per_token_built(tmp_path_factory.mktemp("onnx-per-token"))
    return build(convert_tiny(tmp_path_factory.mktemp("onnx-sd"), "sd", "--coding", "phase-sd"), BuildOptions())


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx-export") / "out"
    return folder, build_onnx(built, folder, spike_outputs=True)


@pytest.fixture(scope="module")
def sessions(exported):
    folder, _ = exported
    return {form: session(folder / f"{form}.onnx", threads=1) for form in ("decoded", "event")}


def test_both_forms_are_valid_onnx_and_described(built, exported):
    folder, report = exported
    assert json.loads((folder / "onnx.json").read_text()) == report
    assert report["opset"] == OPSET == 17
    neurons = [name for name in built.graph if isinstance(built.graph[name], PhaseNeuron)]
    for form in ("decoded", "event"):
        path = folder / f"{form}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
        entry = report["forms"][form]
        assert entry["bytes"] == path.stat().st_size and entry["data"] is None
        assert entry["nodes"] == len(model.graph.node)
        inputs = {given["name"]: given for given in entry["inputs"]}
        assert inputs["input_ids"] == {"name": "input_ids", "shape": ["batch", "seq"], "default": False}
        assert inputs["prefix.layers.0.key"]["default"] and inputs["prefix.layers.0.key"]["shape"] == [2, 1, 16]
        spikes = {f"{name}.spikes" for name in neurons} if form == "event" else set()
        assert {output["name"] for output in entry["outputs"]} == {"logits", *spikes}


@pytest.mark.parametrize("form", ["decoded", "event"])
def test_logits_match_the_simulator(built, sessions, form):
    ids = _ids()
    got = run(sessions[form], {"input_ids": ids}, ["logits"])["logits"]
    expected = simulate(built.graph, built.store, ids, form).logits
    assert _relative_error(got, expected) <= TOLERANCE


def test_event_spike_planes_are_the_simulators(built, sessions):
    ids = _ids()
    outputs = run(sessions["event"], {"input_ids": ids})
    recording = simulate_run(built.graph, built.store, ids, "event")
    for name, spikes in recording.spikes.items():
        assert torch.equal(torch.from_numpy(outputs[f"{name}.spikes"]), spikes), name


@pytest.mark.parametrize("form", ["decoded", "event"])
def test_teacher_forced_check_node_by_node(built, exported, form):
    folder, _ = exported
    ids = _ids()
    recording = simulate_run(built.graph, built.store, ids, form)
    model = onnx.load(str(folder / f"{form}.onnx"))
    cut = teacher_forced(model, built.graph)
    neurons = [name for name in built.graph if isinstance(built.graph[name], PhaseNeuron)]
    assert {given.name for given in cut.graph.input} >= set(neurons)
    figures = agreement(model, built.graph, {"input_ids": ids}, recording.values)
    assert figures["input_difference"] <= TOLERANCE and figures["output_difference"] <= TOLERANCE
    assert figures["flipped"] == 0 and figures["elements"] == sum(recording.values[name].numel() for name in neurons)


@pytest.mark.parametrize("form", ["decoded", "event"])
def test_batch_and_sequence_length_are_dynamic(built, exported, sessions, form):
    """Each row of a batch is the simulator's: node by node (teacher forcing, every coding), and free running for
    the phase model. (Free running, the phase-sd model's batch of 2 flips one spike whose input ORT's batched
    MatMul computes 1 ulp off the simulator's; with its input fed, the neuron agrees bit for bit.)"""
    folder, _ = exported
    model = onnx.load(str(folder / f"{form}.onnx"))
    for batch, length in ((1, 7), (1, 13), (2, 9)):
        ids = _ids(batch, length, seed=length)
        got = run(sessions[form], {"input_ids": ids}, ["logits"])["logits"]
        assert got.shape == (batch, length, 128)
        recording = simulate_run(built.graph, built.store, ids, form)
        figures = agreement(model, built.graph, {"input_ids": ids}, recording.values)
        assert figures["input_difference"] <= TOLERANCE and figures["output_difference"] <= TOLERANCE, figures
        assert figures["flipped_on_equal"] == 0, figures
        if built.record["coding"]["name"] == "phase":
            for row in range(batch):
                expected = simulate(built.graph, built.store, ids[row:row + 1], form).logits
                assert _relative_error(got[row:row + 1], expected) <= TOLERANCE


def test_the_kv_prefix_is_an_input_defaulting_to_the_stored_cache(built, sessions):
    ids = _ids()
    stored = {name: built.store[name] for name in tensor_refs(built.graph) if name.startswith("prefix.")}
    assert len(stored) == 4  # key and value of two layers
    default = run(sessions["decoded"], {"input_ids": ids}, ["logits"])["logits"]
    given = run(sessions["decoded"], {"input_ids": ids, **stored}, ["logits"])["logits"]
    assert np.array_equal(default, given)
    zeroed = {name: torch.zeros_like(cache) for name, cache in stored.items()}
    other = run(sessions["decoded"], {"input_ids": ids, **zeroed}, ["logits"])["logits"]
    assert not np.allclose(other, default)


def test_every_node_type_has_a_lowering():
    assert set(LOWERINGS) == set(NODE_TYPES.values())


SIZES = {"seq": 3, "seq+2": 5, "batch": 2}
FRAME = (Input, Output)
"""Every single-node graph has an Input and an Output: they are checked in all of them."""


def _single_node_graph(node_type):
    """node_type.example() between Inputs and an Output, 4 timesteps; its weights and inputs drawn at random."""
    node, input_types = node_type.example()
    node = node if node.timesteps else dataclasses.replace(node, timesteps=4)
    graph = Graph()
    graph.add_node("node", node)
    for port, of in input_types.items():
        graph.add_node(f"input.{port}", Input(shape=of.shape, dtype=of.dtype, timesteps=4))
        graph.add_edge(f"input.{port}", "node", port)
    graph.add_node("output", Output(timesteps=node.timesteps))
    graph.add_edge("node", "output")
    generator = torch.Generator().manual_seed(0)
    store = {name: torch.randn(ref.shape, generator=generator) for name, ref in tensor_refs(graph).items()}
    inputs = {}
    for port, of in input_types.items():
        shape = [SIZES.get(dim, dim) for dim in of.shape]
        inputs[f"input.{port}"] = (torch.randint(0, 16, shape, generator=generator) if of.dtype == "int64"
                                   else torch.randn(shape, generator=generator))
    return graph, store, inputs


@pytest.mark.parametrize("node_type", [t for t in NODE_TYPES.values() if t not in FRAME], ids=lambda t: t.__name__)
@pytest.mark.parametrize("form", ["decoded", "event"])
def test_every_node_type_runs_as_the_simulator_does(node_type, form, tmp_path):
    graph, store, inputs = _single_node_graph(node_type)
    export(graph, store, tmp_path, form)
    got = run(tmp_path / f"{form}.onnx", inputs, threads=1)["output"]
    expected = output_of(graph, simulate_run(graph, store, inputs, form))
    assert got.shape == tuple(expected.shape)
    assert torch.allclose(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5)


# dyadic weights: every sum exact in float32, so ORT and the simulator agree bit for bit

def _dyadic(shape, generator, scale=8):
    """Multiples of 1/scale in [−1, 1]."""
    return torch.randint(-scale, scale + 1, shape, generator=generator).float() / scale


def _dyadic_graph():
    """One decoder layer over 8 channels (2 query heads, 1 KV head of 4, a 2-token prefix, an online 4×4 Hadamard:
    entries ±½) with dyadic weights and base-2 neurons of power-of-two τ; the final neuron has fitted bases."""
    generator = torch.Generator().manual_seed(0)
    store, graph = {}, Graph()
    steps = 4

    def add(name, node, *sources):
        graph.add_node(name, node)
        for source in sources:
            graph.add_edge(*source) if isinstance(source, tuple) else graph.add_edge(source, name)

    def weight(name, shape):
        store[name] = _dyadic(shape, generator)
        return TensorRef(name, shape)

    def neuron(site, source, tau=2.0):
        add(site, PhaseNeuron.from_params(site, base2_params(tau, steps, 2)), source)

    add("ids", Input(shape=("batch", "seq"), dtype="int64", timesteps=steps))
    add("embed", Embedding(weight=weight("embed.weight", (16, 8)), timesteps=steps), ("ids", "embed", "ids"))
    neuron("layers.0.attn_norm", "embed")
    for proj, width in (("q", 8), ("k", 4), ("v", 4)):
        bias = weight(f"{proj}.bias", (width,)) if proj == "q" else None
        add(f"{proj}_proj", Linear(weight=weight(f"{proj}.weight", (width, 8)), bias=bias, timesteps=steps),
            "layers.0.attn_norm")
        add(f"{proj}_heads", SplitHeads(heads=width // 4, head_dim=4, timesteps=steps), f"{proj}_proj")
    for proj, which in (("k", "key"), ("v", "value")):
        cache = weight(f"prefix.{which}", (1, 2, 4))
        add(f"{proj}_prefix", KVPrefix(which=which, token_ids=(1, 5), cache=cache, timesteps=steps), f"{proj}_heads")
    neuron("layers.0.q", "q_heads", tau=4.0)
    neuron("layers.0.k", "k_prefix", tau=4.0)
    neuron("layers.0.v", "v_prefix", tau=4.0)
    add("scores", ActivationMatmul(which="qk", scaling=0.5, groups=2, timesteps=steps),
        ("layers.0.q", "scores", "a"), ("layers.0.k", "scores", "b"))
    neuron("layers.0.attn_probs", "scores", tau=8.0)
    add("context", ActivationMatmul(which="pv", groups=2, timesteps=steps),
        ("layers.0.attn_probs", "context", "a"), ("layers.0.v", "context", "b"))
    add("merge", MergeHeads(heads=2, head_dim=4, timesteps=steps), "context")
    neuron("layers.0.o_proj_in", "merge", tau=32.0)
    add("o_proj", Linear(weight=weight("o.weight", (8, 8)), timesteps=steps), "layers.0.o_proj_in")
    add("attn_residual", ResidualAdd(timesteps=steps), ("embed", "attn_residual", "residual"),
        ("o_proj", "attn_residual", "branch"))
    neuron("layers.0.mlp_norm", "attn_residual", tau=64.0)
    for proj in ("gate", "up"):
        add(f"{proj}_proj", Linear(weight=weight(f"{proj}.weight", (8, 8)), timesteps=steps), "layers.0.mlp_norm")
    neuron("layers.0.silu", "gate_proj", tau=128.0)
    add("product", ElementwiseProduct(timesteps=steps), ("layers.0.silu", "product", "a"), ("up_proj", "product", "b"))
    signs = torch.tensor([1, -1, 1, 1], dtype=torch.int8)
    add("hadamard", Rotation(n=4, where="online", construction=describe_hadamard(4), signs=signs, timesteps=steps),
        "product")
    neuron("layers.0.down_proj_in", "hadamard", tau=4096.0)
    add("down_proj", Linear(weight=weight("down.weight", (8, 8)), timesteps=steps), "layers.0.down_proj_in")
    add("mlp_residual", ResidualAdd(timesteps=steps), ("attn_residual", "mlp_residual", "residual"),
        ("down_proj", "mlp_residual", "branch"))
    fitted = PhaseNeuronParams(tau=torch.tensor(4096.0), genotype=torch.tensor([0, 0, 1, 1]),
                               d=torch.tensor([2.0, 1.9]), h=torch.tensor([2.1, 2.0]), theta=torch.tensor([1.95, 2.05]))
    add("final_norm", PhaseNeuron.from_params("final_norm", fitted), "mlp_residual")
    add("lm_head", Linear(weight=weight("lm_head.weight", (16, 8)), timesteps=steps), "final_norm")
    add("logits", Output(timesteps=steps), "lm_head")
    validate(graph)
    return graph, store


def test_dyadic_weights_give_the_simulators_spike_planes_exactly(tmp_path):
    graph, store = _dyadic_graph()
    export(graph, store, tmp_path, "both", spike_outputs=True)
    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(3))
    recording = simulate_run(graph, store, ids, "event")
    outputs = run(tmp_path / "event.onnx", {"ids": ids})
    fired = 0
    for name, spikes in recording.spikes.items():
        assert torch.equal(torch.from_numpy(outputs[f"{name}.spikes"]), spikes), name
        fired += int(spikes.any(0).float().mean() > 0.05)
    assert fired == len(recording.spikes)  # every neuron is in use
    for form, values in (("event", outputs), ("decoded", run(tmp_path / "decoded.onnx", {"ids": ids}))):
        expected = output_of(graph, simulate_run(graph, store, ids, form))
        assert torch.allclose(torch.from_numpy(values["logits"]), expected, rtol=1e-6, atol=1e-6), form


# the generalised neuron: a spike budget and any v0 (test_budget_lowering.ZOO)

BUDGET_NEURONS = {**zoo_neurons(T=6), "budget_at_T": dataclasses.replace(base2_params(0.5, 4), max_spikes=torch.tensor(4)),
                  "signed.base2": signed_base2_params(0.5, 6),
                  "signed.fitted": dataclasses.replace(zoo_neurons(T=6)["large_v0"], v0=None, signed_digits=True),
                  "signed.budget": dataclasses.replace(signed_base2_params(0.5, 6), max_spikes=torch.tensor(2))}
"""The zoo, and signed-digit neurons (--coding phase-sd): base 2, fitted bases, and base 2 with a budget K = 2."""


def _zoo_inputs(params, generator):
    """[2, 40, 16]: random values up to past saturation, zeros, and every threshold and all-fire cut with its float
    neighbours, both signs."""
    d, h, _ = step_schedule(params)
    thresholds = params.signed_thresholds() if params.signed_digits else params.thresholds()
    cuts = thresholds + torch.cat([torch.zeros(1), h.cumsum(0)[:-1]])
    cuts = torch.cat([thresholds, cuts])
    special = torch.cat([cuts, torch.nextafter(cuts, torch.tensor(float("inf"))),
                         torch.nextafter(cuts, torch.tensor(-float("inf"))), torch.zeros(3)])
    values = torch.cat([torch.randn(2 * 40 * 16 - 2 * len(special), generator=generator) * d.sum() * 0.7,
                        special, -special])
    return values.reshape(2, 40, 16)


@pytest.mark.parametrize("neuron", BUDGET_NEURONS)
def test_budget_and_v0_neurons_are_bitwise_the_simulators(neuron, tmp_path):
    """One zoo neuron (K = 1, 2, T − 1 or T; v0 negative, ½τ, above θ(t)) or signed-digit neuron: decoded x̂ and
    event spike planes (a signed neuron's int8 digits) of onnxruntime equal the simulator's (phase_quantize,
    phase_encode) bit for bit."""
    params = BUDGET_NEURONS[neuron]
    graph = Graph()
    graph.add_node("x", Input(shape=(2, "seq", 16), dtype="float32", timesteps=params.T))
    graph.add_node("layers.0.silu", PhaseNeuron.from_params("layers.0.silu", params))
    graph.add_node("y", Output(timesteps=params.T))
    graph.add_edge("x", "layers.0.silu")
    graph.add_edge("layers.0.silu", "y")
    export(graph, {}, tmp_path, "both", spike_outputs=True)
    x = _zoo_inputs(params, torch.Generator().manual_seed(0))
    decoded = torch.from_numpy(run(tmp_path / "decoded.onnx", {"x": x}, threads=1)["y"])
    assert torch.equal(decoded, phase_quantize(x, params))
    assert torch.equal(decoded, output_of(graph, simulate_run(graph, {}, {"x": x}, "decoded")))
    event = run(tmp_path / "event.onnx", {"x": x}, threads=1)
    _, spikes = phase_encode(x, params)
    assert torch.equal(torch.from_numpy(event["layers.0.silu.spikes"]), spikes)
    assert torch.equal(torch.from_numpy(event["y"]), output_of(graph, simulate_run(graph, {}, {"x": x}, "event")))
    budget = int(params.max_spikes)
    if 0 < budget < params.T:  # the budget binds on these inputs: without it more spikes would fire
        unlimited = dataclasses.replace(params, max_spikes=torch.tensor(0))
        fired = lambda planes: int((planes != 0).sum(0).max())  # noqa: E731  (a signed digit −1 is a spike too)
        assert fired(spikes) == budget < fired(phase_encode(x, unlimited)[1])


def test_per_token_neuron_is_bitwise_the_simulators(tmp_path):
    """An sdllm neuron with per-token scales (ReduceMax, Div, Where in the graph): decoded x̂ is
    codings.sdllm_per_token and the simulator's, and the event spike planes and outputs the simulator's, bit for
    bit, on rows of every scale and a row of zeros."""
    node = dataclasses.replace(PhaseNeuron.from_params("layers.0.silu", sdllm_unit(8)), token_levels=7)
    graph = Graph()
    graph.add_node("x", Input(shape=(2, "seq", 16), dtype="float32", timesteps=8))
    graph.add_node("layers.0.silu", node)
    graph.add_node("y", Output(timesteps=8))
    graph.add_edge("x", "layers.0.silu")
    graph.add_edge("layers.0.silu", "y")
    export(graph, {}, tmp_path, "both", spike_outputs=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 16, generator=generator) * torch.logspace(-3, 2, 40).view(1, 40, 1)
    x[1, 7] = 0.0
    decoded = torch.from_numpy(run(tmp_path / "decoded.onnx", {"x": x}, threads=1)["y"])
    assert torch.equal(decoded, sdllm_per_token(x, 8))
    assert torch.equal(decoded, output_of(graph, simulate_run(graph, {}, {"x": x}, "decoded")))
    event = run(tmp_path / "event.onnx", {"x": x}, threads=1)
    recording = simulate_run(graph, {}, {"x": x}, "event")
    assert torch.equal(torch.from_numpy(event["layers.0.silu.spikes"]), recording.spikes["layers.0.silu"])
    assert torch.equal(torch.from_numpy(event["y"]), output_of(graph, recording))


@pytest.mark.parametrize("form", ["decoded", "event"])
def test_zoo_model_matches_the_simulator_node_by_node(phase_built, form, tmp_path):
    """The tiny model with its sites cycling through the zoo, checked as the SmolLM2 window is (teacher forcing):
    every neuron's input and the logits within float tolerance of the simulator's, and every neuron bit for bit
    the simulator's wherever its input is. (Free running, the rate-like sites' many thresholds catch 1-ulp
    differences of a summation order: a flipped spike then grows layer by layer.)"""
    built = phase_built
    graph = zoo_graph(built.graph)
    export(graph, built.store, tmp_path, form)
    ids = _ids()
    recording = simulate_run(graph, built.store, ids, form)
    figures = agreement(onnx.load(str(tmp_path / f"{form}.onnx")), graph, {"input_ids": ids}, recording.values)
    assert figures["input_difference"] <= TOLERANCE and figures["output_difference"] <= TOLERANCE, figures
    assert figures["flipped_on_equal"] == 0 and figures["flipped"] <= 1e-3 * figures["elements"], figures
    budgets = {name: graph[name].max_spikes for name in recording.spikes if graph[name].max_spikes}
    assert budgets and all(int(recording.spikes[name].sum(0).max()) <= budget for name, budget in budgets.items())


def test_dyadic_zoo_graph_gives_the_simulators_spike_planes_exactly(tmp_path):
    graph, store = _dyadic_graph()
    graph = zoo_graph(graph, ("spikedattn", "ttfs", "negative_v0", "sdllm", "rate", "large_v0"))
    export(graph, store, tmp_path, "both", spike_outputs=True)
    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(3))
    recording = simulate_run(graph, store, ids, "event")
    outputs = run(tmp_path / "event.onnx", {"ids": ids})
    for name, spikes in recording.spikes.items():
        assert torch.equal(torch.from_numpy(outputs[f"{name}.spikes"]), spikes), name
    for form, values in (("event", outputs), ("decoded", run(tmp_path / "decoded.onnx", {"ids": ids}))):
        expected = output_of(graph, simulate_run(graph, store, ids, form))
        assert torch.allclose(torch.from_numpy(values["logits"]), expected, rtol=1e-6, atol=1e-6), form


def test_writing_is_deterministic(built, exported, tmp_path):
    folder, _ = exported
    build_onnx(built, tmp_path, "decoded")
    assert (tmp_path / "decoded.onnx").read_bytes() == (folder / "decoded.onnx").read_bytes()


def test_external_data_past_the_protobuf_limit(built, exported, monkeypatch, tmp_path):
    monkeypatch.setattr(export_module, "PROTOBUF_LIMIT", 2**16)
    monkeypatch.setattr(export_module, "HEADROOM", 0)
    report = build_onnx(built, tmp_path, "decoded")
    entry = report["forms"]["decoded"]
    assert entry["data"] == "decoded.onnx.data" and (tmp_path / "decoded.onnx.data").is_file()
    folder, _ = exported
    assert (tmp_path / "decoded.onnx").stat().st_size < (folder / "decoded.onnx").stat().st_size / 3  # weights left
    ids = _ids()
    got = run(tmp_path / "decoded.onnx", {"input_ids": ids}, ["logits"], threads=1)["logits"]
    expected = run(folder / "decoded.onnx", {"input_ids": ids}, ["logits"], threads=1)["logits"]
    assert np.array_equal(got, expected)


def test_weights_stream_to_the_data_file_as_they_are_lowered(built, monkeypatch, tmp_path):
    """Past the limit on the graph's own weights, every initializer is written to the data file as it is made (the
    model reaches write_model with no weight bytes inline): the files are byte for byte those of lowering the whole
    model first and moving its weights out afterwards."""
    monkeypatch.setattr(export_module, "PROTOBUF_LIMIT", 2**16)
    monkeypatch.setattr(export_module, "HEADROOM", 0)
    assert export_module.weight_bytes(built.graph) > 2**16
    inline_at_write = []
    real_write_model = export_module.write_model

    def watching(model, path, data_written=False):
        inline_at_write.append(max(len(tensor.raw_data) for tensor in model.graph.initializer))
        return real_write_model(model, path, data_written)

    monkeypatch.setattr(export_module, "write_model", watching)
    streamed = build_onnx(built, tmp_path / "streamed", "decoded")
    assert inline_at_write[-1] < export_module.EXTERNAL_MIN_BYTES  # nothing big was held until the end
    monkeypatch.setattr(export_module, "weight_bytes", lambda graph: 0)  # the whole model first, then moved out
    afterwards = build_onnx(built, tmp_path / "afterwards", "decoded")
    assert inline_at_write[-1] >= export_module.EXTERNAL_MIN_BYTES
    for name in ("decoded.onnx", "decoded.onnx.data"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "afterwards" / name).read_bytes()
    assert streamed["forms"]["decoded"]["data"] == afterwards["forms"]["decoded"]["data"] == "decoded.onnx.data"


def test_a_node_without_lowering_is_named_with_its_type(built, monkeypatch, tmp_path):
    monkeypatch.delitem(LOWERINGS, Rotation)
    with pytest.raises(SpikecompileError, match="node layers.0.mlp.online_hadamard: the onnx backend has no lowering "
                                                "for Rotation"):
        build_onnx(built, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.onnx"))


def test_bad_options_and_unwritable_output(built, tmp_path):
    with pytest.raises(SpikecompileError, match="onnx form 'spiking': choose one of decoded, event, both"):
        check_form("spiking")
    with pytest.raises(SpikecompileError, match="onnx form 'both': a model holds one form"):
        to_onnx(built.graph, built.store, "both")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpikecompileError, match="cannot create the ONNX output folder"):
        build_onnx(built, blocker / "out")
    unassigned = built.graph.copy()
    unassigned.replace("logits", dataclasses.replace(unassigned["logits"], timesteps=None))
    with pytest.raises(SpikecompileError, match="node logits: no timesteps; run the assign_timesteps pass"):
        to_onnx(unassigned, built.store, "event")


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    for name in [name for name in sys.modules if name.startswith("spikecompile.backends.onnx")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    with pytest.raises(SpikecompileError, match=r"^the onnx backend needs the onnx extra: pip install "
                                                r"'spikecompile\[onnx\]'$"):
        importlib.import_module("spikecompile.backends.onnx")


def test_importing_spikecompile_imports_no_onnx():
    code = "import sys, spikecompile, spikecompile.backends, spikecompile.build; print('onnx' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.smollm2
@requires_smollm2
def test_smollm2_window_matches_the_simulator(smollm2_t8_path, tmp_path):
    from spikecompile.data import load_text, token_windows

    built = build(smollm2_t8_path, BuildOptions())
    build_onnx(built, tmp_path / "onnx")
    ids = token_windows(built.tokenizer, load_text("builtin", "eval"), 128, 1, "evaluation")[0]
    for form in ("decoded", "event"):
        # free running, one 1-ulp difference flips a spike and the flip grows layer by layer: compare node by node
        model = onnx.load(str(tmp_path / "onnx" / f"{form}.onnx"))
        reference = simulate_run(built.graph, built.store, ids, form).values
        figures = agreement(model, built.graph, {"input_ids": ids}, reference)
        assert figures["input_difference"] <= 1e-5 and figures["output_difference"] <= 1e-5, (form, figures)
        assert figures["flipped_on_equal"] == 0 and figures["flipped"] <= 1e-4 * figures["elements"], (form, figures)


def test_cli_build_target_onnx(tmp_path):
    from click.testing import CliRunner
    from conftest import convert_tiny

    from spikecompile.cli import cli

    model = convert_tiny(tmp_path)
    result = CliRunner().invoke(cli, ["build", str(model), "--target", "onnx", "-o", str(tmp_path / "onnx"),
                                      "--onnx-form", "event", "--spike-outputs"])
    assert result.exit_code == 0, result.output
    checked = onnx.load(str(tmp_path / "onnx" / "event.onnx"))
    onnx.checker.check_model(checked, full_check=True)
    assert any(output.name.endswith(".spikes") for output in checked.graph.output)
    assert not (tmp_path / "onnx" / "decoded.onnx").exists()


def test_running_sums_are_onnx_cumsum_bit_for_bit():
    """The event rules' running sums X_t (products, nonlinearities) add step by step in float32 as ONNX CumSum does
    (torch.cumsum would accumulate in double): the simulator's and onnxruntime's agree bit for bit."""
    from onnx import TensorProto, helper

    from spikecompile.backends.sim.simulate import _running_sums

    graph = helper.make_graph(
        [helper.make_node("CumSum", ["x", "axis"], ["y"])], "cumsum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("axis", TensorProto.INT64, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    x = torch.randn(8, 3, 50, 70, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 70)
    (onnx_sums,) = run(session(model.SerializeToString()), {"x": x.numpy()}).values()
    assert torch.equal(_running_sums(x), torch.from_numpy(np.asarray(onnx_sums)))
