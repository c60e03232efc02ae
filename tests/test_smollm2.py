"""The real embedded SmolLM2-135M-Instruct end to end (slow: run with `pytest -m slow`)."""

import pytest
import torch

from spikecompile.conversion.convert import load_spiking_model
from spikecompile.data import load_text, token_windows
from spikecompile.evaluation import perplexity

from conftest import requires_smollm2

pytestmark = [pytest.mark.slow, pytest.mark.smollm2, requires_smollm2]


@pytest.fixture(scope="module")
def smollm2_t8(smollm2_t8_path):
    return load_spiking_model(str(smollm2_t8_path))


@pytest.fixture(scope="module")
def smollm2_built(smollm2_t8_path):
    from spikecompile.build import BuildOptions, build

    return build(smollm2_t8_path, BuildOptions())


def _window(tokenizer, length):
    return token_windows(tokenizer, load_text("builtin", "eval"), length, 1, "evaluation")[0]


def test_smollm2_folded_ir_computes_the_converted_model(smollm2_t8, smollm2_t8_path, smollm2_built):
    """Sites off, the folded graph is the converted float model (prefix included) within 1e-4. Sites on, float32
    rounding of the folded weights (~1e-7) flips a few quantization decisions, so the exact check of the fold
    runs in float64: the unfolded graph (rotations as explicit nodes) folded in float64 against itself unfolded."""
    from spikecompile.backends.sim.simulate import output_of, run
    from spikecompile.ir import PhaseNeuron, interpret, retyped, sites_off
    from spikecompile.build import BuildOptions, build
    from spikecompile.passes import CompileInputs, PassManager

    ids = _window(smollm2_t8.tokenizer, 128)
    with torch.no_grad(), smollm2_t8.sites.all_off():
        expected = smollm2_t8.logits(ids)
    got = interpret(smollm2_built.graph, smollm2_built.store, ids, {PhaseNeuron: sites_off})
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()

    unfolded = build(smollm2_t8_path, BuildOptions(disabled=("fold_hadamard",)))
    graph, store = retyped(unfolded.graph, unfolded.store, torch.float64)
    folded, _ = PassManager(["fold_hadamard"]).run(graph, CompileInputs(store))
    expected = output_of(graph, run(graph, store, ids))
    assert (output_of(folded, run(folded, store, ids)) - expected).abs().max() <= 1e-9 * expected.abs().max()


def test_smollm2_event_mode_equals_decoded_mode(smollm2_built):
    from spikecompile.backends.sim.simulate import output_of, run
    from spikecompile.ir import retyped

    graph, store = retyped(smollm2_built.graph, smollm2_built.store, torch.float64)
    ids = _window(smollm2_built.tokenizer, 64)
    decoded, event = run(graph, store, ids, "decoded"), run(graph, store, ids, "event")
    expected = output_of(graph, decoded)
    assert (output_of(graph, event) - expected).abs().max() <= 1e-9 * expected.abs().max()
    for name, spikes in event.spikes.items():
        assert torch.equal(spikes, decoded.spikes[name]), name


def test_smollm2_t8_stays_close_to_the_ann(smollm2_t8):
    assert len(smollm2_t8.sites) == 30 * 9 + 1
    windows = token_windows(smollm2_t8.tokenizer, load_text("builtin", "eval"), 512, 2, "evaluation")
    ann = perplexity(smollm2_t8.ann_logits, windows, progress=False)
    snn = perplexity(smollm2_t8.logits, windows, progress=False)
    assert 1.0 < snn / ann < 1.10


def test_smollm2_sites_never_lose_to_base2(smollm2_t8):
    for name, entry in smollm2_t8.record["sites"].items():
        calib = entry["calibration"]
        assert calib["mse"] <= calib["base2_mse"] * (1 + 1e-6), name
        assert calib["lloyd_max_mse"] <= calib["mse"], name


def test_smollm2_rotation_keeps_the_float_model(smollm2_t8):
    from spikecompile.loading import load_model, resolve_source

    original, tokenizer = load_model(resolve_source(None))
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = original(ids).logits
        rotated = smollm2_t8.ann_logits(ids)
    assert (rotated - reference).abs().max() <= 1e-4 * reference.abs().max()
