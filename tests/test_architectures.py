"""Each accepted LLaMA-family architecture, as a tiny random model of its family built here: LLaMA-1/2 (multi-head,
untied), LLaMA-3 (GQA, rope_scaling llama3), Mistral (sliding_window null) and Qwen2 (q/k/v biases, tied
embeddings). Each goes convert → the float model's logits (sites off, rotated: unchanged) → build (IR) → the
interpreter (sites off; sites on in float64) → the simulator; Qwen2's biases also through NIR and ONNX."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import (
    FAST_CONVERT, assert_layered_build_is_whole_model_build, assert_same_neurons, build_tiny_llama, build_tiny_tokenizer, random_norms_and_biases, synthetic_text,
)

from spikecompile import ir
from spikecompile.backends.sim.simulate import output_of, run
from spikecompile.build import BuildOptions, build
from spikecompile.cli import cli
from spikecompile.conversion.convert import load_spiking_model
from spikecompile.ir import PhaseNeuron, interpret, retyped, sites_off
from spikecompile.passes import CompileInputs, PassManager

SITES_OFF = {PhaseNeuron: sites_off}
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             head_dim=16, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
"""LLaMA-3's scaling with a 64-token original context: with head_dim 16 the frequencies j ≥ 2 are rescaled."""


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return random_norms_and_biases(MistralForCausalLM(MistralConfig(**SHAPE, num_key_value_heads=2,
                                                                     sliding_window=None)))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return random_norms_and_biases(Qwen2ForCausalLM(Qwen2Config(**SHAPE, num_key_value_heads=2,
                                                                 tie_word_embeddings=True)))


FAMILIES = {
    "llama2": lambda: build_tiny_llama(num_key_value_heads=4, tie_word_embeddings=False),
    "llama3": lambda: build_tiny_llama(rope_parameters=LLAMA3_ROPE, max_position_embeddings=512,
                                       tie_word_embeddings=False),
    "mistral": _mistral,
    "qwen2": _qwen2,
}


def _ids(length=24, seed=0):
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _close(got, expected, tolerance=1e-4):
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, the source model, its converted model.pt): T=6, 2 grains, Hadamard rotation, KV prefix."""
    root = tmp_path_factory.mktemp(request.param)
    model = FAMILIES[request.param]()
    model.save_pretrained(root / "source")
    build_tiny_tokenizer().save_pretrained(root / "source")
    (root / "calib.txt").write_text(synthetic_text())
    result = CliRunner().invoke(cli, ["convert", str(root / "source"), "-o", str(root / "model.pt"), "-T", "6",
                                      "-n", "2", "--calib", str(root / "calib.txt"), *FAST_CONVERT])
    assert result.exit_code == 0, result.output
    model.config._attn_implementation = "eager"
    return request.param, model, root / "model.pt"


@pytest.fixture(scope="module")
def built(family):
    return build(family[2], BuildOptions())


def test_the_source_is_of_its_family(family):
    name, model, path = family
    config = json.loads((path.parent / "source" / "config.json").read_text())
    assert config["model_type"] == {"llama2": "llama", "llama3": "llama"}.get(name, name)
    if name == "llama3":
        assert config["rope_parameters"]["rope_type"] == "llama3"
        assert model.model.rotary_emb.inv_freq[-1] < 500000.0 ** -(14 / 16) / 7  # rescaled by the factor 8
    if name == "qwen2":
        attention = model.model.layers[0].self_attn
        assert attention.q_proj.bias.abs().sum() > 0 and attention.o_proj.bias is None
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_converted_float_model_is_the_source_model(family):
    """Rotated (q/k/v biases included), the model with every site off computes the source's logits."""
    _, source, path = family
    spiking = load_spiking_model(str(path))
    ids = _ids()
    with torch.no_grad():
        _close(spiking.ann_logits(ids), source(ids).logits)
    evaluated = CliRunner().invoke(cli, ["eval", str(path), "--ppl", str(path.parent / "calib.txt"), "--seqlen", "64",
                                         "--max-windows", "1", "--no-progress"])
    assert evaluated.exit_code == 0 and "ratio SNN/ANN" in evaluated.output, evaluated.output


def test_built_ir_computes_the_converted_model(family, built):
    """Sites off, the folded graph is the converted float model (prefix included); its neurons are the fitted
    ones; sites on, in float64, the graph with the rotations as nodes folded computes itself unfolded."""
    _, _, path = family
    spiking = load_spiking_model(str(path))
    ids = _ids()
    with torch.no_grad(), spiking.sites.all_off():
        expected = spiking.logits(ids)
    _close(interpret(built.graph, built.store, ids, SITES_OFF), expected)
    assert_same_neurons(built.graph, spiking.sites)
    unfolded = build(path, BuildOptions(disabled=("fold_hadamard",)))
    graph, store = retyped(unfolded.graph, unfolded.store, torch.float64)
    folded, _ = PassManager(["fold_hadamard"]).run(graph, CompileInputs(store))
    expected = output_of(graph, run(graph, store, ids))
    _close(output_of(folded, run(folded, store, ids)), expected, 1e-9)


def test_simulator_event_mode_is_decoded_mode(built):
    graph, store = retyped(built.graph, built.store, torch.float64)
    ids = _ids(16)
    decoded, event = run(graph, store, ids, "decoded"), run(graph, store, ids, "event")
    _close(output_of(graph, event), output_of(graph, decoded), 1e-9)


# ---- Qwen2's biases in the lowerings --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen2_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2-lowering")
    _qwen2().save_pretrained(root / "source")
    build_tiny_tokenizer().save_pretrained(root / "source")
    (root / "calib.txt").write_text(synthetic_text())
    result = CliRunner().invoke(cli, ["convert", str(root / "source"), "-o", str(root / "model.pt"), "-T", "4",
                                      "-n", "2", "--calib", str(root / "calib.txt"), *FAST_CONVERT])
    assert result.exit_code == 0, result.output
    return build(root / "model.pt", BuildOptions())


def _biased(graph):
    return [name for name in graph if isinstance(graph[name], ir.Linear) and graph[name].bias is not None]


def test_qwen2_graph_has_the_q_k_v_biases(qwen2_built):
    assert _biased(qwen2_built.graph) == [f"layers.{layer}.self_attn.{proj}" for layer in (0, 1)
                                          for proj in ("q_proj", "k_proj", "v_proj")]
    # v's output is rotated per head and folded: its bias is the rotated one, q's and k's are the source's
    assert qwen2_built.graph["layers.0.self_attn.v_proj"].bias.name.startswith("folded.")


def test_qwen2_attention_block_in_nir_carries_the_biases(qwen2_built, tmp_path):
    nir = pytest.importorskip("nir", reason="the NIR backend needs the nir extra")
    from spikecompile.backends.nir import export
    from spikecompile.backends.nir import run as run_nir
    from spikecompile.backends.nir.consumer import NirtorchRunner
    from spikecompile.ir import evaluate

    graph, store = qwen2_built.graph, qwen2_built.store
    block = ir.decoder_block(graph, 0, "attn")
    report = export(block, store, tmp_path)
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"layers.0.self_attn.{proj}"
        (entry,) = [entry for entry in report["nodes"] if entry["node"] == name]
        assert entry["fidelity"] == "exact"
        affine = nir.read(str(tmp_path / entry["file"])).nodes[name]
        assert isinstance(affine, nir.Affine)
        assert torch.equal(torch.from_numpy(affine.bias), graph[name].bias.resolve(store))
    pytest.importorskip("nirtorch", reason="the independent NIR consumer nirtorch is not installed")
    x = evaluate(graph, store, _ids())[graph.inputs("layers.0.input_layernorm")["x"]]
    expected = interpret(block, store, {"block_input": x})
    got = run_nir(tmp_path, {"block_input": x}, NirtorchRunner())["block_output"]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max())


@pytest.mark.parametrize("form", ["decoded", "event"])
def test_qwen2_in_onnx_carries_the_biases(qwen2_built, tmp_path, form):
    onnx = pytest.importorskip("onnx", reason="the ONNX backend needs the onnx extra")
    pytest.importorskip("onnxruntime", reason="the ONNX backend needs the onnx extra")
    from onnx import numpy_helper

    from spikecompile.backends.onnx import build_onnx, run as run_onnx, session
    from spikecompile.backends.sim import simulate

    build_onnx(qwen2_built, tmp_path, form=form)
    model = onnx.load(str(tmp_path / f"{form}.onnx"))
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for name in _biased(qwen2_built.graph):
        bias = qwen2_built.graph[name].bias.resolve(qwen2_built.store)
        held = [torch.from_numpy(value.copy()) for value in initializers.values() if value.shape[-1:] == bias.shape
                and torch.equal(torch.from_numpy(value.copy()).reshape(-1, bias.numel())[0], bias)]
        assert held, name
    ids = _ids(20)
    got = torch.as_tensor(run_onnx(session(tmp_path / f"{form}.onnx", threads=1), {"input_ids": ids},
                                   ["logits"])["logits"])
    expected = simulate(qwen2_built.graph, qwen2_built.store, ids, form).logits
    _close(got, expected, 1e-5)


def test_qwen2_in_lava_is_refused_in_one_line(qwen2_built, tmp_path):
    """The Lava backend's synapses (Dense/Sparse) carry no bias: a biased Linear is refused by name."""
    from spikecompile.backends.lava.emit import lower
    from spikecompile.errors import SpikecompileError
    from spikecompile.hardware.loihi2 import load_loihi2

    block = ir.decoder_block(qwen2_built.graph, 0, "attn")
    with pytest.raises(SpikecompileError, match="matrix layers.0.self_attn.q_proj: a Linear with a bias") as error:
        lower(block, qwen2_built.store, 4, load_loihi2())
    assert "\n" not in str(error.value)


def test_the_layered_build_is_the_whole_model_build(family, built):
    assert_layered_build_is_whole_model_build(family[2], built)
