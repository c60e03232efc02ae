"""The coding zoo (conversion.codings): each coding's neuron equation, its conversion, and its run through the IR."""

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_same_neurons, convert_tiny

from spikecompile import modelfile
from spikecompile.backends.sim.simulate import run
from spikecompile.build import BuildOptions, build
from spikecompile.cli import cli
from spikecompile.conversion.codings import CODINGS, closed_form, coding_params, sdllm_clip
from spikecompile.conversion.convert import load_spiking_model
from spikecompile.conversion.fit import FitConfig, fit_sites
from spikecompile.conversion.weights import rtn_quantize_weights
from spikecompile.ir import Output, PhaseNeuron, interpret, retyped, sites_off
from spikecompile.neuron import phase_encode, phase_quantize

FIXED = CODINGS[1:]


def _values(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4000, generator=generator) * torch.tensor([[1.0], [0.05], [6.0]])


@pytest.mark.parametrize("coding", FIXED)
@pytest.mark.parametrize("T", [4, 8])
def test_the_neuron_is_the_coding_s_closed_form(coding, T):
    x, tau = _values(), torch.tensor([2.0, 0.125, 4.0])
    clip = torch.tensor([0.25, 0.0, 1.0]) if coding == "sdllm" else None
    params = coding_params(coding, tau, T, clip=clip)
    expected = torch.sign(x) * closed_form(coding, x.abs(), tau, T, clip)
    # las: the neuron sums d(t)·s_t, the closed form multiplies level·step: equal up to one rounding
    assert torch.allclose(phase_quantize(x, params), expected, rtol=0, atol=1e-6 * float(tau.max()))
    if coding != "las":
        assert torch.equal(phase_quantize(x, params), expected)


@pytest.mark.parametrize("coding, most", [("spikedattn", 2), ("ttfs", 1), ("rate", 8), ("sdllm", 7), ("las", 8)])
def test_spike_budgets_and_levels(coding, most):
    x, tau = _values(), torch.tensor([0.5, 0.03, 2.0])  # small enough for some values to saturate
    params = coding_params(coding, tau, 8)
    sign, spikes = phase_encode(x, params)
    assert int(spikes.sum(0).max()) == most  # the budget is reached and never exceeded
    magnitudes = phase_quantize(x, params)[0].abs().unique()
    levels = {"spikedattn": 1 + 8 + 28, "ttfs": 1 + 8, "rate": 1 + 8, "sdllm": 1 + 7, "las": 256}[coding]
    assert len(magnitudes) <= levels
    # the spikes are ternary in effect: a sign times 0/1 planes
    assert set(sign.unique().tolist()) <= {-1, 0, 1} and spikes.dtype == torch.bool


def test_rate_is_round_to_nearest_with_t_plus_one_levels():
    tau = torch.tensor(0.5)
    x = torch.tensor([0.0, 0.2, 0.26, 0.74, 0.76, 3.9, 4.1, 100.0, -0.76])
    out = phase_quantize(x, coding_params("rate", tau, 8))
    assert out.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 4.0, 4.0, 4.0, -1.0]


def test_ttfs_fires_once_at_the_first_crossing():
    tau = torch.tensor(1.0)
    params = coding_params("ttfs", tau, 4)
    x = torch.tensor([0.9, 0.45, 0.2, 0.01])
    _, spikes = phase_encode(x, params)
    assert spikes.sum(0).tolist() == [1, 1, 1, 0]
    assert phase_quantize(x, params).tolist() == [0.5, 0.25, 0.125, 0.0]  # the crossed level τ·2^-(t+1)


def test_sdllm_membrane_clipping_raises_the_share_of_zero_counts():
    x = _values()[0:1]
    plain = fit_sites(x, FitConfig(T=8, coding="sdllm"))
    clipped = fit_sites(x, FitConfig(T=8, coding="sdllm", membrane_clip=0.6))
    zero_plain = float((phase_quantize(x, plain.params) == 0).float().mean())
    zero_clipped = float((phase_quantize(x, clipped.params) == 0).float().mean())
    assert zero_clipped >= 0.6 > zero_plain
    assert float(clipped.params.v0) < float(clipped.params.tau) / 2  # v0 = τ/2 − c, c > 0
    c = sdllm_clip(x.abs(), clipped.params.tau, 0.6)
    assert torch.allclose(clipped.params.v0, clipped.params.tau / 2 - c)


@pytest.mark.parametrize("coding", FIXED)
def test_tau_is_chosen_by_error(coding):
    x = _values()
    fit = fit_sites(x, FitConfig(T=6, coding=coding))
    for factor in (0.8, 1.25):  # moving τ off the chosen one does not lower the real neuron's error
        params = coding_params(coding, fit.params.tau * factor, 6, clip=None)
        moved = (phase_quantize(x, params) - x).square().mean(-1)
        assert bool((moved >= fit.mse * 0.999).all())


def test_rtn_weights_have_at_most_2b_minus_1_levels_per_row():
    from conftest import build_tiny_llama

    model = build_tiny_llama()
    record = rtn_quantize_weights(model, 4)
    assert record["bits"] == 4 and record["linears"] == 7 * len(model.model.layers)
    weight = model.model.layers[0].mlp.down_proj.weight
    scale = weight.abs().amax(1, keepdim=True) / 7
    assert torch.allclose(weight / scale, torch.round(weight / scale), atol=1e-4)
    assert all(len(row.unique()) <= 15 for row in weight)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    paths = {coding: convert_tiny(root, coding, "--coding", coding, "-T", "8") for coding in FIXED}
    paths["sdllm-w4"] = convert_tiny(root, "sdllm-w4", "--coding", "sdllm", "-T", "8", "--weight-bits", "4",
                                     "--membrane-clip", "0.3")
    return paths


@pytest.mark.parametrize("name", [*FIXED, "sdllm-w4"])
def test_each_coding_converts_builds_and_runs_the_same_in_both_modes(zoo, name):
    path = zoo[name]
    record = modelfile.load(path)
    coding = name.split("-")[0]
    assert record["coding"]["name"] == coding
    budget = {"spikedattn": 2, "ttfs": 1, "sdllm": 7}.get(coding, 0)
    assert {entry["max_spikes"] for entry in record["sites"].values()} == {budget}
    result = build(path, BuildOptions())
    neurons = [result.graph[name] for name in result.graph if isinstance(result.graph[name], PhaseNeuron)]
    assert {node.max_spikes for node in neurons} == {budget}
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    # the IR computes what the converted model computes: its float function (sites off) and the same neurons (sites
    # on, the folded IR and the model are two computation orders: in float32 a 1-ulp difference flips a spike that
    # sits on a threshold, differently on each CPU); decoded, the simulator is the interpreter
    spiking = load_spiking_model(str(path))
    (output,) = [node for node in result.graph if isinstance(result.graph[node], Output)]
    decoded = run(result.graph, result.store, ids, "decoded").values[output]
    assert torch.equal(decoded, interpret(result.graph, result.store, ids))
    with torch.no_grad(), spiking.sites.all_off():
        expected = spiking.logits(ids)
    got = interpret(result.graph, result.store, ids, {PhaseNeuron: sites_off})
    assert torch.allclose(got, expected, atol=2e-4 * float(got.abs().max()))
    assert_same_neurons(result.graph, spiking.sites)
    # and the event simulation (per-step spikes, integrate-then-fire) the decoded one
    graph, store = retyped(result.graph, result.store, torch.float64)
    event = run(graph, store, ids, "event")
    exact = run(graph, store, ids, "decoded").values[output]
    summed = event.values[output].sum(0) if output in event.stepped else event.values[output]
    assert float((summed - exact).abs().max() / exact.abs().max()) < 1e-9


def test_rtn_weights_are_reapplied_on_load(zoo):
    spiking = load_spiking_model(str(zoo["sdllm-w4"]))
    assert spiking.record["weights"]["bits"] == 4
    weight = spiking.model.model.layers[1].self_attn.q_proj.weight
    scale = weight.abs().amax(1, keepdim=True) / 7
    assert torch.allclose(weight / scale, torch.round(weight / scale), atol=1e-4)


def test_same_inputs_give_the_same_model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    first = convert_tiny(tmp_path, "a", "--coding", "spikedattn")
    second = convert_tiny(tmp_path, "b", "--coding", "spikedattn")
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("options, message", [
    (["--coding", "pulse"], "--coding 'pulse': unknown coding; choose one of phase, las, spikedattn, rate, ttfs, sdllm"),
    (["--coding", "sdllm", "-T", "6"], "--coding sdllm -T 6: sdllm unfolds b-bit counts over T = 2^(b-1) steps"),
    (["--weight-bits", "5"], "--weight-bits 5: supported RTN weight widths are 4, 6, 8"),
    (["--membrane-clip", "0.2"], "--membrane-clip is SDLLM's membrane clipping; use it with --coding sdllm"),
    (["--coding", "sdllm", "-T", "8", "--membrane-clip", "1.5"], "--membrane-clip 1.5: the share of zero counts"),
])
def test_bad_coding_options_are_one_line_errors(tmp_path, options, message):
    result = CliRunner().invoke(cli, ["convert", "-o", str(tmp_path / "m.pt"), *options])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


def test_base2_codings_move_to_another_t_with_their_budget_and_the_others_refuse(zoo):
    from spikecompile.errors import SpikecompileError

    result = build(zoo["spikedattn"], BuildOptions(timesteps=6))
    neurons = [result.graph[name] for name in result.graph if isinstance(result.graph[name], PhaseNeuron)]
    assert {(node.timesteps, node.max_spikes) for node in neurons} == {(6, 2)}
    assert all(node.has_default_v0 for node in neurons)
    with pytest.raises(SpikecompileError, match="cannot run at T=6"):
        build(zoo["rate"], BuildOptions(timesteps=6))
