"""sdllm with per-token min-max scales (issue 16, item 6): the scale is each token's max|x| / K at run time. The
conversion path (eval) runs it; in the IR it is the PhaseNeuron's token_levels, which the interpreter, the simulator
(decoded and event) and the ledger (its max, reciprocal and rescale counted) run, and ONNX lowers
(tests/test_onnx.py); Lava and the Loihi 2 mapping refuse it in one line naming the site and the option."""

import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import convert_tiny

from spikecompile.backends.sim import simulate
from spikecompile.backends.sim.counting import RECIPROCAL_MACS, count
from spikecompile.backends.sim.results import Counts
from spikecompile.backends.sim.simulate import MODES, run
from spikecompile.build import BuildOptions, build
from spikecompile.cli import cli
from spikecompile.conversion.codings import sdllm_per_token
from spikecompile.conversion.convert import load_spiking_model
from spikecompile.ir import PhaseNeuron, interpret, retyped
from spikecompile.ir.interpret import RUNNERS


def _invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def hand_per_token(x: torch.Tensor, T: int) -> torch.Tensor:
    """Round each row to the nearest multiple of max|row|/K (ties toward zero), K = T − 1 levels per sign."""
    K = T - 1
    out = torch.zeros_like(x)
    for index, row in enumerate(x.reshape(-1, x.shape[-1])):
        step = float(row.abs().max()) / K
        if step == 0:
            continue
        counts = [min(max(int(torch.ceil(torch.tensor(abs(float(v)) / step - 0.5))), 0), K) for v in row]
        out.reshape(-1, x.shape[-1])[index] = torch.tensor([c * step for c in counts]) * row.sign()
    return out


@pytest.mark.parametrize("T", [4, 8])
def test_per_token_quantizer_is_min_max_rounding_per_row(T):
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(T))
    x[1, 2] = 0.0  # a row of zeros stays zero
    got = sdllm_per_token(x, T)
    assert torch.allclose(got, hand_per_token(x.double(), T).float(), rtol=1e-6, atol=0)  # float32 rounding
    peaks = x.abs().amax(-1)
    assert torch.allclose(got.abs().amax(-1), peaks, rtol=1e-6)  # each row's largest value is a level: K · max/K
    assert got[1, 2].abs().sum() == 0
    levels = (got / (peaks.unsqueeze(-1) / (T - 1)).clamp_min(1e-30)).round()
    assert int(levels.abs().max()) == T - 1 and torch.allclose(levels * peaks.unsqueeze(-1) / (T - 1), got, rtol=1e-5)


@pytest.fixture(scope="module")
def per_token_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdllm")
    return root, convert_tiny(root, "pt", "--coding", "sdllm", "-T", "8", "--sdllm-scales", "per-token")


def test_per_token_model_runs_its_sites_per_token_and_evals(per_token_model, tmp_path):
    root, model = per_token_model
    spiking = load_spiking_model(str(model))
    assert spiking.record["coding"]["scales"] == "per-token"
    site = spiking.sites["layers.0.silu"]
    assert site.per_token_steps == 8
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(site(x), sdllm_per_token(x, 8))
    result = _invoke("eval", model, "--ppl", root / "calib.txt", "--seqlen", 48, "--max-windows", 2, "--no-progress",
                     "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert figures["coding"]["scales"] == "per-token" and figures["snn_ppl"] > 0


def per_token_built(root):
    """The tiny model converted with --coding sdllm -T 8 --sdllm-scales per-token and built."""
    return build(convert_tiny(root, "pt", "--coding", "sdllm", "-T", "8", "--sdllm-scales", "per-token"),
                 BuildOptions())


@pytest.fixture(scope="module")
def built(per_token_model):
    _, model = per_token_model
    return build(model, BuildOptions())


def _ids(length=20, seed=0):
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _neurons(graph):
    return [name for name in graph if isinstance(graph[name], PhaseNeuron)]


def test_the_ir_neuron_is_sdllm_at_unit_scale_with_k_levels_and_is_the_conversions_quantizer(built):
    """Every site is the sdllm neuron at τ = 1 with token_levels K = T − 1, and the interpreter's rule for it is
    codings.sdllm_per_token bit for bit, on rows of zeros too."""
    neurons = _neurons(built.graph)
    assert neurons and all(built.graph[name].token_levels == 7 and float(built.graph[name].tau) == 1.0
                           and built.graph[name].max_spikes == 7 for name in neurons)
    node = built.graph[neurons[0]]
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1)) * 3
    x[0, 4] = 0.0
    assert torch.equal(RUNNERS[PhaseNeuron](node, {"x": x}, {}), sdllm_per_token(x, 8))


def test_the_built_graph_computes_the_converted_model(built, per_token_model):
    """The IR's logits are the converted model's (its sites quantizing per token) to float rounding."""
    _, model = per_token_model
    spiking = load_spiking_model(str(model))
    ids = _ids()
    with torch.no_grad():
        expected = spiking.logits(ids)
    got = interpret(built.graph, built.store, ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_decoded_and_event_modes_agree_with_the_same_spikes_and_counts(built):
    graph, store = retyped(built.graph, built.store, torch.float64)
    decoded, event = run(graph, store, _ids(), "decoded"), run(graph, store, _ids(), "event")
    for name, value in decoded.values.items():
        summed = event.values[name].sum(0) if name in event.stepped else event.values[name]
        scale = value.abs().max().clamp(min=1e-12) if value.is_floating_point() else 1
        assert ((summed - value).abs().max() / scale) < 1e-9, name
    for name, spikes in event.spikes.items():
        assert torch.equal(spikes, decoded.spikes[name]), name
    counted = {mode: simulate(built.graph, built.store, _ids(), mode, dtype=torch.float64) for mode in MODES}
    assert counted["decoded"].snn == counted["event"].snn and counted["decoded"].sites == counted["event"].sites


def test_the_ledger_counts_the_max_the_reciprocal_and_the_rescale(built):
    """A per-token neuron costs what the same neuron with a constant τ costs, plus per row of N elements N compares
    (adds), RECIPROCAL_MACS + 1 + T MACs and N MACs with their writes; its spikes cost the same ACs downstream."""
    ids = _ids()
    result = simulate(built.graph, built.store, ids, "decoded")
    static = built.graph.copy()
    for name in _neurons(static):
        static.replace(name, dataclasses.replace(static[name], token_levels=0))
    shapes, spikes = run(built.graph, built.store, ids, "decoded").shapes, {}
    recording = run(built.graph, built.store, ids, "decoded")
    spikes = recording.spikes
    per_token, constant = count(built.graph, shapes, spikes)[0], count(static, shapes, spikes)[0]
    checked = 0
    for name in built.graph:
        if isinstance(built.graph[name], PhaseNeuron):
            elements, width, T = math.prod(shapes[name]), shapes[name][-1], built.graph[name].timesteps
            rows = elements // width
            macs = elements + rows * (RECIPROCAL_MACS + 1 + T)
            extra = Counts(mac=macs, ac=elements, reads=2 * (macs + elements), writes=elements)
            assert per_token[name] == constant[name] + extra, name
            checked += 1
        else:
            assert per_token[name] == constant[name], name
    assert checked == len(_neurons(built.graph)) and result.snn == per_token


def test_deployment_backends_refuse_it_naming_the_site_and_the_option(built, per_token_model, tmp_path):
    """Lava and the Loihi 2 mapping have no run-time max and divide: one line naming the site and the option, no
    output; NIR runs the neurons from their IR records and says why in its fidelity report (tests/test_nir.py)."""
    _, model = per_token_model
    commands = {"lava": ["build", model, "--target", "lava", "-o", tmp_path / "lava"],
                "sim --numerics loihi2": ["build", model, "--target", "sim", "--numerics", "loihi2", "-o",
                                          tmp_path / "sim"],
                "inspect --formats loihi2": ["inspect", model, "--formats", "loihi2"]}
    for what, command in commands.items():
        result = _invoke(*command)
        assert result.exit_code == 2, (what, result.output)
        assert result.output.count("\n") == 1 and "--sdllm-scales per-token" in result.output, (what, result.output)
        assert "site layers.0.attn_norm: " in result.output or "site layers.0." in result.output, result.output
    assert not (tmp_path / "lava").exists() and not (tmp_path / "sim").exists()


@pytest.mark.parametrize("options, message", [
    (("--sdllm-scales", "per-token"), "--sdllm-scales per-token: SDLLM's run-time min-max scales; use it with --coding sdllm"),
    (("--coding", "sdllm", "-T", "8", "--sdllm-scales", "per-token", "--membrane-clip", "0.2"),
     "without --membrane-clip"),
    (("--coding", "sdllm", "-T", "8", "--sdllm-scales", "dynamic"), "--sdllm-scales 'dynamic': choose one of static, per-token"),
])
def test_bad_sdllm_scales_options(tmp_path, options, message):
    result = _invoke("convert", tmp_path / "missing", "-o", tmp_path / "m.pt", *options)
    assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "m.pt").exists()
