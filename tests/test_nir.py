"""The NIR backend: every emitted file loads with stock nir.read; every IR node type (found by introspection) is
either lowered exactly or described by a manifest rule, and round-trips through our reader; the unrolled phase
neuron run by an independent consumer (nirtorch with explicit node maps; norse's IF neuron for the approximate
variant) equals phase_encode / phase_quantize bit for bit; a traced MLP block run segment by segment in the
consumer, its other ops by our interpreter, matches the interpreted block; bad input gives one-line errors."""

import dataclasses
import importlib
import importlib.util
import json
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import requires_smollm2, save_tiny_llama, synthetic_text
from test_budget_lowering import ZOO, zoo_graph, zoo_neurons
from test_ir import assert_same_node, example_graph

from spikecompile import ir
from spikecompile.build import BuildOptions, build
from spikecompile.cli import cli
from spikecompile.errors import SpikecompileError
from spikecompile.ir import evaluate, interpret
from spikecompile.neuron import (
    PhaseNeuronParams, base2_params, even_genotype, phase_encode, phase_quantize, signed_base2_params, step_schedule,
)

nir = pytest.importorskip("nir", reason="the NIR backend needs the nir extra: pip install 'spikecompile[nir]'")
from spikecompile.backends.nir import build_nir, export, read, run, write_reference_trace
from spikecompile.backends.nir.consumer import NODE_MAP, NirtorchRunner
from spikecompile.backends.nir.lower import LOWERINGS, NOT_EXPRESSIBLE

requires_nirtorch = pytest.mark.skipif(importlib.util.find_spec("nirtorch") is None,
                                       reason="the independent NIR consumer nirtorch is not installed "
                                              "(scripts/install.sh installs it)")
requires_norse = pytest.mark.skipif(None in (importlib.util.find_spec("norse"), importlib.util.find_spec("nirtorch")),
                                    reason="norse (and nirtorch, which runs its IF neurons) is not installed "
                                           "(scripts/install.sh installs both)")

EXACT_TYPES = {"Input", "Output", "Threshold", "Scale", "Affine", "Linear"}
APPROXIMATE_TYPES = {"Input", "Output", "IF", "Linear", "Affine"}


# --- independent consumers ----------------------------------------------------------------------------------------

def _norse_consumer():
    """nirtorch running the approximate variant's IF nodes as norse's integrate-and-fire neuron."""
    import norse.torch as norse

    def integrate_and_fire(node):
        return norse.IAFCell(norse.IAFParameters(v_th=torch.from_numpy(node.v_threshold)))

    return NirtorchRunner({**NODE_MAP, nir.IF: integrate_and_fire})


# --- helpers -------------------------------------------------------------------------------------------------------

def _nir_files(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return [folder / path for path in manifest["files"] if path.endswith(".nir")]


def _store_for(graph):
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(ref.shape, generator=generator) for name, ref in ir.tensor_refs(graph).items()}


def assert_same_export(graph, store, folder):
    """Our reader gives back the same nodes, fields, edges (with ports) and referenced tensors."""
    back, weights = read(folder)
    assert set(back) == set(graph) and sorted(back.edges(), key=str) == sorted(graph.edges(), key=str)
    for name in graph:
        assert_same_node(graph[name], back[name])
    for name, ref in ir.tensor_refs(graph).items():
        assert torch.equal(ref.resolve(store), ref.resolve(weights)), name


def _neuron_graph(params, width=16):
    """x [tokens, width] → one phase neuron → y."""
    graph = ir.Graph()
    graph.add_node("x", ir.Input(shape=("tokens", width), dtype="float32", timesteps=params.T))
    graph.add_node("layers.0.silu", ir.PhaseNeuron.from_params("layers.0.silu", params))
    graph.add_node("y", ir.Output(timesteps=params.T))
    graph.add_edge("x", "layers.0.silu")
    graph.add_edge("layers.0.silu", "y")
    return graph


def _neuron_inputs(params, width=16):
    """Signed random values up to past saturation, zeros, values on and just above every threshold θ(t) − v0 and
    every all-fire cut θ(t) − v0 + Σ_{u<t} h(u) (where a budget runs out), and saturating ones."""
    generator = torch.Generator().manual_seed(1)
    d, h, _ = step_schedule(params)
    reach = d.sum()  # the largest output
    thresholds = params.signed_thresholds() if params.signed_digits else params.thresholds()
    cuts = torch.cat([thresholds, thresholds + torch.cat([torch.zeros(1), h.cumsum(0)[:-1]])])
    above = torch.nextafter(cuts, torch.tensor(float("inf")))
    special = torch.cat([cuts, above, torch.zeros(4), reach * torch.tensor([3.0, 1e-9, 0.5])])
    values = torch.cat([torch.randn(60 * width, generator=generator) * reach * 0.6, special, -special])
    return torch.cat([values, torch.zeros(-len(values) % width)]).reshape(-1, width)


NEURONS = {
    "fitted": PhaseNeuronParams(tau=torch.tensor(0.8), genotype=even_genotype(5, 2), d=torch.tensor([2.0, 1.93]),
                                h=torch.tensor([2.06, 1.97]), theta=torch.tensor([2.03, 1.98])),
    "base2": base2_params(0.5, 6),
    "thresholds_below_v0": PhaseNeuronParams(tau=torch.tensor(1.3), genotype=even_genotype(5, 2),
                                             d=torch.tensor([2.0, 2.1]), h=torch.tensor([2.0, 2.2]),
                                             theta=torch.tensor([2.1, 2.6])),
    **{f"zoo.{variant}": params for variant, params in zoo_neurons(T=5).items()},
    "budget_at_T": dataclasses.replace(base2_params(0.5, 4), max_spikes=torch.tensor(4)),  # never binds
    "signed.base2": signed_base2_params(0.5, 6),
    "signed.fitted": PhaseNeuronParams(tau=torch.tensor(0.8), genotype=even_genotype(5, 2), d=torch.tensor([2.0, 1.93]),
                                       h=torch.tensor([2.06, 1.97]), theta=torch.tensor([2.03, 1.98]),
                                       signed_digits=True),
}
"""Zoo neurons (test_budget_lowering.ZOO): spike budgets K = 1, 2, T − 1 and v0 negative, rate-like (½τ with
bases 1) and above the late thresholds; signed-digit neurons (--coding phase-sd), base 2 and fitted."""


def signed_train(x, params):
    """The reference's signed spike train σ·s_t, float [T, ...] (a signed-digit neuron's s_t carry their sign)."""
    sign, spikes = phase_encode(x, params)
    return (spikes if params.signed_digits else sign * spikes).float()


# --- coverage and round trip ---------------------------------------------------------------------------------------

def test_every_node_type_is_lowered_or_described_by_a_manifest_rule():
    handled = set(LOWERINGS) | set(NOT_EXPRESSIBLE) | {ir.Input, ir.Output}
    assert set(ir.NODE_TYPES.values()) == handled
    assert not set(LOWERINGS) & set(NOT_EXPRESSIBLE)


@pytest.mark.parametrize("variant", ["exact", "approximate"])
@pytest.mark.parametrize("cls", sorted(ir.NODE_TYPES.values(), key=lambda cls: cls.__name__),
                         ids=lambda cls: cls.__name__)
def test_node_type_round_trips_through_stock_nir_files(cls, variant, tmp_path):
    graph = example_graph(cls)
    store = _store_for(graph)
    report = export(graph, store, tmp_path, variant=variant)
    (entry,) = [entry for entry in report["nodes"] if entry["node"] == "node"]
    if cls in LOWERINGS:
        assert entry["file"].startswith("segments/") and entry["fidelity"] in ("exact", "approximated")
    elif cls in NOT_EXPRESSIBLE:
        assert entry["fidelity"] == "not expressible in NIR" and entry["reason"] == NOT_EXPRESSIBLE[cls]
    assert report["unsupported"] == []
    allowed = EXACT_TYPES if variant == "exact" else APPROXIMATE_TYPES
    for path in _nir_files(tmp_path):
        segment = nir.read(path)  # stock reader, type checks on
        assert {type(node).__name__ for node in segment.nodes.values()} <= allowed
        assert segment.metadata["spikecompile.variant"] == variant
    assert_same_export(graph, store, tmp_path)


# --- the unrolled neuron in independent consumers ------------------------------------------------------------------

@requires_nirtorch
@pytest.mark.parametrize("neuron", NEURONS)
def test_unrolled_neuron_in_nirtorch_is_bit_exact(neuron, tmp_path):
    params = NEURONS[neuron]
    export(_neuron_graph(params), {}, tmp_path)
    x = _neuron_inputs(params)
    consumer = NirtorchRunner()
    decoded = run(tmp_path, {"x": x}, consumer)["y"]
    assert torch.equal(consumer.signed_spikes("layers.0.silu", params.T), signed_train(x, params))
    assert torch.equal(decoded, phase_quantize(x, params))


@pytest.mark.parametrize("neuron", NEURONS)
def test_unrolled_neuron_has_the_documented_node_count_and_round_trips(neuron, tmp_path):
    """10T + 2 nodes without a binding budget, 18T − 6K − 2 with one (1 ≤ K < T), 9T − 1 for a signed-digit
    neuron; read back to the same node."""
    params = NEURONS[neuron]
    graph = _neuron_graph(params)
    export(graph, {}, tmp_path)
    (path,) = _nir_files(tmp_path)
    nodes = [node for node in nir.read(path).nodes.values() if node.metadata.get("spikecompile.node") == "layers.0.silu"]
    T, K = params.T, int(params.max_spikes)
    expected = 9 * T - 1 if params.signed_digits else 18 * T - 6 * K - 2 if 0 < K < T else 10 * T + 2
    assert len(nodes) == expected
    assert_same_export(graph, {}, tmp_path)


@requires_norse
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # raised by norse's import
@pytest.mark.parametrize("neuron", ["fitted", "thresholds_below_v0", "zoo.spikedattn", "zoo.sdllm", "zoo.large_v0",
                                    "signed.fitted"])
def test_approximate_variant_in_norse_if_neurons_is_labelled_and_exact_in_one_step(neuron, tmp_path):
    params = NEURONS[neuron]
    report = export(_neuron_graph(params), {}, tmp_path, variant="approximate")
    (entry,) = [entry for entry in report["nodes"] if entry["node"] == "layers.0.silu"]
    assert entry["fidelity"] == "approximated" and "IF" in entry["reason"]
    (path,) = _nir_files(tmp_path)
    assert nir.read(path).metadata["spikecompile.fidelity"].startswith("approximate: ")
    x = _neuron_inputs(params)
    consumer = _norse_consumer()
    decoded = run(tmp_path, {"x": x}, consumer)["y"]
    assert torch.equal(consumer.signed_spikes("layers.0.silu", params.T), signed_train(x, params))
    assert torch.equal(decoded, phase_quantize(x, params))


# --- a traced model --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny LLaMA converted (phase coding, T=4, 2 grains, rotated, with a prefix) and built."""
    root = tmp_path_factory.mktemp("nir")
    text = root / "calib.txt"
    text.write_text(synthetic_text())
    model = root / "model.pt"
    result = CliRunner().invoke(cli, ["convert", str(save_tiny_llama(root / "tiny")), "-o", str(model), "-T", "4",
                                      "-n", "2", "--calib", str(text), "--calib-seqlen", "64", "--calib-windows", "2",
                                      "--samples-per-site", "512", "--no-progress"])
    assert result.exit_code == 0, result.output
    return build(model, BuildOptions())


def _block_input(built, which="mlp"):
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    norm = "layers.0.post_attention_layernorm" if which == "mlp" else "layers.0.input_layernorm"
    return evaluate(built.graph, built.store, ids)[built.graph.inputs(norm)["x"]]


MLP_FIDELITY = {
    "block_input": "exact", "layers.0.post_attention_layernorm": "not expressible in NIR", "layers.0.mlp_norm": "exact",
    "layers.0.mlp.gate_proj": "exact", "layers.0.mlp.up_proj": "exact", "layers.0.mlp.act_fn": "not expressible in NIR",
    "layers.0.silu": "exact", "layers.0.mlp.product": "not expressible in NIR",
    "layers.0.mlp.online_hadamard": "not expressible in NIR", "layers.0.down_proj_in": "exact",
    "layers.0.mlp.down_proj": "exact", "block_output": "exact",
}


@requires_nirtorch
def test_mlp_block_run_by_a_consumer_matches_the_interpreter(built, tmp_path):
    block = ir.decoder_block(built.graph, 0, "mlp")
    report = export(block, built.store, tmp_path)
    assert {entry["node"]: entry["fidelity"] for entry in report["nodes"]} == MLP_FIDELITY
    x = _block_input(built)
    expected = interpret(block, built.store, {"block_input": x})
    consumer = NirtorchRunner()
    values = run(tmp_path, {"block_input": x}, consumer)
    assert torch.allclose(values["block_output"], expected, rtol=1e-5, atol=1e-6 * expected.abs().max())
    # and the reference simulator's event mode (per-step spikes through every node) gives the same block output
    from spikecompile.backends.sim import simulate
    event = simulate(block, built.store, {"block_input": x}, "event").logits
    assert torch.allclose(values["block_output"], event, rtol=1e-4, atol=1e-5 * expected.abs().max())
    trace = nir.read_data(str(write_reference_trace(tmp_path, {"block_input": x})))
    for site in ("layers.0.mlp_norm", "layers.0.silu", "layers.0.down_proj_in"):
        recorded = torch.from_numpy(trace.nodes[site].observables["spikes"].data)  # [tokens, T, width]
        ours = consumer.signed_spikes(site, 4).reshape(4, -1, recorded.shape[-1]).transpose(0, 1)
        assert recorded.dtype == torch.int8 and torch.equal(ours, recorded.float()) and recorded.abs().sum() > 0
    assert torch.equal(torch.from_numpy(trace.nodes["output.layers.0.mlp.down_proj"].observables["value"].data),
                       expected.reshape(-1, 1, expected.shape[-1]))


@requires_nirtorch
def test_attention_block_run_by_a_consumer_matches_the_interpreter(built, tmp_path):
    block = ir.decoder_block(built.graph, 0, "attn")
    report = export(block, built.store, tmp_path)
    (probs,) = [entry for entry in report["nodes"] if entry["node"] == "layers.0.attn_probs"]
    assert probs["fidelity"] == "not expressible in NIR" and "fixed last dim" in probs["reason"]
    x = _block_input(built, "attn")
    expected = interpret(block, built.store, {"block_input": x})
    got = run(tmp_path, {"block_input": x}, NirtorchRunner())["block_output"]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max())


@requires_nirtorch
@pytest.mark.parametrize("variants", [ZOO[:3], ZOO[3:]], ids=lambda variants: "+".join(variants))
def test_zoo_mlp_block_run_by_a_consumer_matches_the_interpreter(built, variants, tmp_path):
    """The MLP block's three sites made zoo neurons (budgets, v0 negative, rate-like, large): the consumer's
    spike trains are the reference's and its output the interpreter's (and the simulator's event mode)."""
    block = zoo_graph(ir.decoder_block(built.graph, 0, "mlp"), variants)
    report = export(block, built.store, tmp_path)
    assert {entry["node"]: entry["fidelity"] for entry in report["nodes"]} == MLP_FIDELITY
    assert_same_export(block, built.store, tmp_path)
    x = _block_input(built)
    expected = interpret(block, built.store, {"block_input": x})
    consumer = NirtorchRunner()
    values = run(tmp_path, {"block_input": x}, consumer)
    assert torch.allclose(values["block_output"], expected, rtol=1e-5, atol=1e-6 * expected.abs().max())
    from spikecompile.backends.sim import simulate
    event = simulate(block, built.store, {"block_input": x}, "event").logits
    assert torch.allclose(values["block_output"], event, rtol=1e-4, atol=1e-5 * expected.abs().max())
    reference = evaluate(block, built.store, {"block_input": x})
    for site in ("layers.0.mlp_norm", "layers.0.silu", "layers.0.down_proj_in"):
        node = block[site]
        sign, spikes = phase_encode(reference[block.inputs(site)["x"]], node.params())
        assert torch.equal(consumer.signed_spikes(site, node.timesteps), (sign * spikes).float()), site
        if node.max_spikes:
            assert int(spikes.sum(0).max()) <= node.max_spikes


def test_whole_model_export_loads_in_stock_nir_and_reads_back(built, tmp_path):
    report = build_nir(built, tmp_path)
    assert report["counts"]["exact"] > 0 and report["unsupported"] == []
    for path in _nir_files(tmp_path):
        nir.read(path)
    assert_same_export(built.graph, built.store, tmp_path)
    first = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    build_nir(built, tmp_path)
    assert first == {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}


def assert_whole_model_runs_in_nirtorch(result, folder, ids):
    """The whole model exported and run with every segment in nirtorch (its other steps by our interpreter): every
    IR value is the decoded interpreter's bit for bit, the logits are the simulator's (decoded mode), and every
    lowered neuron's spike trains are the simulator's. Exact, not close: the segments compute in the interpreter's
    float32 order (the same Linear on the same tensors, two-term sums, the neuron unrolled bit-exactly), so any
    difference is a fault. The export has segments with two Inputs (residual adds), which nirtorch builds only
    through the consumer's merged Input (consumer._one_input). Returns the logits."""
    from spikecompile.backends.sim.simulate import output_of, run as simulate_run

    report = build_nir(result, folder)
    steps = json.loads((folder / "manifest.json").read_text())["steps"]
    assert any("segment" in step and len(step["inputs"]) == 2 for step in steps)
    graph = result.graph
    (source,) = [name for name in graph if isinstance(graph[name], ir.Input)]
    (output,) = [name for name in graph if isinstance(graph[name], ir.Output)]
    consumer = NirtorchRunner()
    values = run(folder, {source: ids}, consumer)
    expected = evaluate(graph, result.store, ids)
    assert set(values) < set(expected)  # run gives the values that leave a segment, not those inside one
    assert [name for name in values if not torch.equal(values[name], expected[name])] == []
    recording = simulate_run(graph, result.store, ids, "decoded")
    assert torch.equal(values[output], output_of(graph, recording))
    fidelity = {entry["node"]: entry["fidelity"] for entry in report["nodes"]}
    neurons = [name for name in graph if isinstance(graph[name], ir.PhaseNeuron)]
    lowered = [name for name in neurons if fidelity[name] == "exact"]
    assert lowered and {fidelity[name] for name in neurons} - {"exact"} <= {"not expressible in NIR"}
    assert {name for name in neurons if f"{name}.pos.spike0" in consumer.spikes} == set(lowered)
    for name in lowered:
        steps = graph[name].timesteps
        if graph[name].signed_digits:  # the simulator keeps the signed digits s_t themselves
            assert torch.equal(consumer.signed_spikes(name, steps), recording.spikes[name].float()), name
        else:
            assert torch.equal(consumer.spike_planes(name, steps), recording.spikes[name]), name
    return values[output]


def test_export_holds_one_segments_nir_arrays_at_a_time(built, tmp_path, monkeypatch):
    """The whole-model export lowers each segment with its weights only when it writes it (a first pass lowers
    against placeholder weights): when a node is lowered with its weights, the only such lowerings still alive are
    earlier nodes of its own segment (lowering everything first, as before, kept all of them). The files are those
    of lowering everything first (the read-back tests check them)."""
    import gc
    import weakref

    export_module = importlib.import_module("spikecompile.backends.nir.export")
    alive, live_before = [], []
    real_lower = export_module.lower

    def recording_lower(name, node, value, variant, store):
        if isinstance(store, export_module._Placeholders):
            return real_lower(name, node, value, variant, store)
        gc.collect(0)  # the youngest generation: a full collection per node took minutes in a long test run
        live_before.append(sum(ref() is not None for ref in alive))
        lowered = real_lower(name, node, value, variant, store)
        alive.append(weakref.ref(lowered))
        return lowered

    monkeypatch.setattr(export_module, "lower", recording_lower)
    export(built.graph, built.store, tmp_path)
    steps = json.loads((tmp_path / "manifest.json").read_text())["steps"]
    sizes = [len(step["nodes"]) for step in steps if "segment" in step]
    assert live_before == [index for size in sizes for index in range(size)]
    assert len(sizes) > 4 and max(sizes) < len(alive) / 4


@requires_nirtorch
def test_whole_model_runs_in_nirtorch_equal_to_the_interpreter_and_simulator(built, tmp_path):
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = assert_whole_model_runs_in_nirtorch(built, tmp_path, ids)
    assert logits.shape == (1, 24, 128) and logits.isfinite().all()


@requires_nirtorch
def test_phase_sd_model_runs_in_nirtorch_equal_to_the_interpreter_and_simulator(tmp_path_factory, tmp_path):
    """The tiny model converted with --coding phase-sd: every site lowered on its two Threshold channels, its
    signed digits (−1 included) and every value the simulator's and interpreter's bit for bit."""
    from test_signed_lowering import signed_built

    result = signed_built(tmp_path_factory.mktemp("nir-sd"))
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = assert_whole_model_runs_in_nirtorch(result, tmp_path, ids)
    assert logits.shape == (1, 24, 128) and logits.isfinite().all()
    assert_same_export(result.graph, result.store, tmp_path)


@requires_nirtorch
def test_nirtorch_runner_refuses_names_nirtorch_would_merge():
    """nirtorch names a node's module by its NIR name with dots made underscores: two names that become one would
    share one module, silently."""
    import numpy as np

    width, ones = np.array([3]), np.ones(3, np.float32)
    graph = nir.NIRGraph(nodes={"input.x": nir.Input(input_type=width), "a.b": nir.Scale(scale=ones),
                                "a_b": nir.Scale(scale=ones), "output.y": nir.Output(output_type=width)},
                         edges=[("input.x", "a.b"), ("a.b", "a_b"), ("a_b", "output.y")])
    with pytest.raises(ValueError, match="NIR nodes a.b and a_b are both a_b in nirtorch"):
        NirtorchRunner()(graph, {"input.x": torch.ones(2, 3)})


@pytest.mark.slow
@pytest.mark.smollm2
@requires_smollm2
@requires_nirtorch
def test_smollm2_whole_model_runs_in_nirtorch_equal_to_the_interpreter_and_simulator(smollm2_t8_path, tmp_path):
    """The whole converted SmolLM2 (30 blocks, T=8) on a 16-token window: see assert_whole_model_runs_in_nirtorch."""
    from spikecompile.data import load_text, token_windows

    result = build(smollm2_t8_path, BuildOptions())
    ids = token_windows(result.tokenizer, load_text("builtin", "eval"), 16, 1, "evaluation")[0]
    logits = assert_whole_model_runs_in_nirtorch(result, tmp_path, ids)
    assert logits.shape == (1, 16, 49152) and logits.isfinite().all()


def test_whole_zoo_model_export_reads_back(built, tmp_path):
    graph = zoo_graph(built.graph)
    report = export(graph, built.store, tmp_path)
    assert report["unsupported"] == [] and report["counts"]["approximated"] == 0
    assert_same_export(graph, built.store, tmp_path)


# --- bad input -------------------------------------------------------------------------------------------------------

def test_a_foreign_nir_file_is_refused_with_a_clear_message(tmp_path):
    import numpy as np

    foreign = tmp_path / "theirs.nir"
    nir.write(foreign, nir.NIRGraph.from_list(nir.Linear(weight=np.eye(3, dtype=np.float32))))
    with pytest.raises(SpikecompileError, match="a NIR file from another tool"):
        read(foreign)
    with pytest.raises(SpikecompileError, match="no manifest.json, so not a spikecompile NIR export"):
        read(tmp_path)
    export(_neuron_graph(NEURONS["base2"]), {}, tmp_path / "ours")
    (segment,) = _nir_files(tmp_path / "ours")
    with pytest.raises(SpikecompileError, match="one segment of a spikecompile NIR export"):
        read(segment)
    segment.write_bytes(foreign.read_bytes())
    with pytest.raises(SpikecompileError, match="sha256 differs"):
        read(tmp_path / "ours")


def test_an_unwritable_folder_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(SpikecompileError, match="is not writable"):
        export(_neuron_graph(NEURONS["base2"]), {}, tmp_path / "out")


@pytest.fixture
def unknown_node_type():
    @ir.base.node_type
    class Sparkle(ir.IRNode):
        """y = sparkle(x): a node type no backend knows."""

    yield Sparkle
    ir.NODE_TYPES.pop("Sparkle")


def test_a_node_without_a_rule_is_reported_and_fails_only_when_strict(unknown_node_type, tmp_path):
    graph = ir.Graph()
    graph.add_node("x", ir.Input(shape=("seq", 8), dtype="float32"))
    graph.add_node("layers.0.sparkle", unknown_node_type())
    graph.add_node("y", ir.Output())
    graph.add_edge("x", "layers.0.sparkle")
    graph.add_edge("layers.0.sparkle", "y")
    report = export(graph, {}, tmp_path / "lenient")
    assert report["unsupported"] == ["layers.0.sparkle"]
    (entry,) = [entry for entry in report["nodes"] if entry["node"] == "layers.0.sparkle"]
    assert entry["fidelity"] == "not expressible in NIR" and "no manifest rule" in entry["reason"]
    assert json.loads((tmp_path / "lenient" / "fidelity.json").read_text())["unsupported"] == ["layers.0.sparkle"]
    with pytest.raises(SpikecompileError, match=r"--strict: .*layers\.0\.sparkle \(Sparkle\)"):
        export(graph, {}, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


def test_missing_nir_names_the_extra(monkeypatch):
    for name in [name for name in sys.modules if name.startswith("spikecompile.backends.nir")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nir", None)
    message = r"^the nir backend needs the nir extra: pip install 'spikecompile\[nir\]'$"
    with pytest.raises(SpikecompileError, match=message):
        importlib.import_module("spikecompile.backends.nir")


def test_cli_build_target_nir(tmp_path):
    from click.testing import CliRunner
    from conftest import convert_tiny

    from spikecompile.cli import cli

    model = convert_tiny(tmp_path)
    result = CliRunner().invoke(cli, ["build", str(model), "--target", "nir", "-o", str(tmp_path / "nir")])
    assert result.exit_code == 0, result.output
    assert "exact" in result.output
    segments = sorted((tmp_path / "nir" / "segments").glob("*.nir"))
    assert segments and all(isinstance(nir.read(str(path)), nir.NIRGraph) for path in segments)


def test_an_export_of_another_format_version_asks_to_export_again(tmp_path):
    export(_neuron_graph(NEURONS["zoo.ttfs"]), {}, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(SpikecompileError, match="NIR manifest format version 1, this spikecompile reads version 3; "
                                                "export again"):
        read(tmp_path)


@requires_nirtorch
def test_per_token_scales_run_from_their_records_and_say_why(tmp_path_factory, tmp_path):
    """sdllm with per-token scales: NIR has no reduction for the row's max, so every neuron is "not expressible in
    NIR" with that reason and runs from its IR record (our interpreter); the rest is lowered, and every value that
    leaves a segment is the interpreter's bit for bit."""
    from test_sdllm_per_token import per_token_built

    result = per_token_built(tmp_path_factory.mktemp("nir-per-token"))
    report = build_nir(result, tmp_path)
    graph = result.graph
    neurons = [name for name in graph if isinstance(graph[name], ir.PhaseNeuron)]
    entries = {entry["node"]: entry for entry in report["nodes"]}
    assert neurons and all(entries[name]["fidelity"] == "not expressible in NIR" for name in neurons)
    # the attention probabilities have no fixed width: refused for that first, as every coding's are
    assert all("per-token scales" in entries[name]["reason"] for name in neurons
               if graph[name].kind != "attn_probs")
    assert report["counts"]["exact"] > 0 and report["unsupported"] == []
    (source,) = [name for name in graph if isinstance(graph[name], ir.Input)]
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    values = run(tmp_path, {source: ids}, NirtorchRunner())
    expected = evaluate(graph, result.store, ids)
    assert values and [name for name in values if not torch.equal(values[name], expected[name])] == []
