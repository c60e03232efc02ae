"""Spike penalty in the fit and per-site timestep budgets (issue 16, items 1 and 3), on tiny random models."""

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import FAST_CONVERT, convert_tiny, save_tiny_llama, synthetic_text
from spikecompile import modelfile
from spikecompile.cli import cli
from spikecompile.conversion.budget import TIMESTEP_CHOICES, LinearCost, allocate, site_curves
from spikecompile.conversion.fit import FitConfig, fit_sites, spikes_per_activation

BUDGET = 2.5  # ACs per ANN MAC: between T = 4 everywhere (about 1.6 on the tiny model) and T = 16


def _invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def _workspace(root):
    if not (root / "tiny" / "config.json").exists():
        save_tiny_llama(root / "tiny")
    (root / "calib.txt").write_text(synthetic_text())
    return root / "tiny", root / "calib.txt"


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    folder, text = _workspace(root)
    output = root / "budget.pt"
    result = _invoke("convert", folder, "-o", output, "-n", "2", "--calib", text, *FAST_CONVERT,
                     "--spikes-per-mac", BUDGET)
    assert result.exit_code == 0, result.output
    return root, output


def test_spike_penalty_zero_writes_the_same_model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    plain = convert_tiny(tmp_path, "plain")
    zero = convert_tiny(tmp_path, "zero", "--spike-penalty", "0")
    assert plain.read_bytes() == zero.read_bytes()
    record = modelfile.load(plain)
    assert "spike_penalty" not in record["conversion"]["options"] and "spike_penalty" not in record["conversion"]["fit"]
    assert "budget" not in record


def test_spike_penalty_trades_error_for_spikes():
    generator = torch.Generator().manual_seed(0)
    samples = torch.stack([torch.randn(2048, generator=generator),
                           torch.nn.functional.silu(2 * torch.randn(2048, generator=generator))])
    quick = dict(T=6, n_grains=2, coding="phase-sd", rounds=2, search_rounds=8)
    plain = fit_sites(samples, FitConfig(**quick))
    penalised = fit_sites(samples, FitConfig(**quick, spike_penalty=1.0))
    spikes = [spikes_per_activation(samples, fit.params) for fit in (plain, penalised)]
    assert (spikes[1] < spikes[0]).all()
    assert (penalised.mse >= plain.mse).all()  # the spikes were bought with error, not found for free
    objective = [fit.mse / fit.base2_mse + 1.0 * count for fit, count in zip((plain, penalised), spikes)]
    assert (objective[1] <= objective[0] + 1e-6).all()


def test_spike_penalty_refused_for_fixed_codings_and_negative(tmp_path):
    folder, text = _workspace(tmp_path)
    for extra, needle in ((["--coding", "las", "--spike-penalty", "0.5"], "--spike-penalty"),
                          (["--spike-penalty", "-1"], "--spike-penalty -1.0")):
        result = _invoke("convert", folder, "-o", tmp_path / "x.pt", "--calib", text, *FAST_CONVERT, *extra)
        assert result.exit_code == 2 and result.output.startswith("error: ") and needle in result.output
        assert result.output.count("\n") == 1 and not (tmp_path / "x.pt").exists()


def test_allocation_on_a_planted_case_beats_uniform_timesteps():
    """Site b is 1000x as sensitive as a and c: at the cost of uniform T = 6 the greedy gives b more steps and
    lowers the predicted loss below uniform's."""
    generator = torch.Generator().manual_seed(1)
    samples = torch.randn(3, 1024, generator=generator)
    curves = site_curves(samples, grains=2)
    names, groups = ["a", "b", "c"], [["a"], ["b"], ["c"]]
    fisher = torch.tensor([1.0, 1000.0, 1.0], dtype=torch.float64)
    cost = LinearCost(per_spike=dict.fromkeys(names, 1.0), per_step=[0.01] * 3)

    def total(choice, what):
        column = {name: TIMESTEP_CHOICES.index(choice[name]) for name in names}
        if what == "cost":
            return sum(float(curves.spikes[i, column[n]]) + 0.01 * choice[n] for i, n in enumerate(names))
        return sum(0.5 * float(fisher[i] * curves.mse[i, column[n]]) for i, n in enumerate(names))

    uniform = dict.fromkeys(names, 6)
    chosen = allocate(names, groups, curves, fisher, cost, total(uniform, "cost"))
    assert total(chosen, "cost") <= total(uniform, "cost") + 1e-9
    assert chosen["b"] > 6 and total(chosen, "loss") < 0.5 * total(uniform, "loss")
    with pytest.raises(ValueError):
        allocate(names, groups, curves, fisher, cost, 0.1)


def test_budget_model_file_holds_per_site_timesteps(budgeted):
    _, path = budgeted
    record = modelfile.load(path)  # schema-checked, budget record included
    budget = record["budget"]
    assert budget["kind"] == "spikes_per_mac" and budget["measured"] <= BUDGET
    steps = {name: entry["timesteps"] for name, entry in record["sites"].items()}
    assert steps == budget["timesteps"] and len(set(steps.values())) >= 2
    for layer in (0, 1):  # spike trains that meet run one T
        for pair in (("q", "k"), ("attn_probs", "v"), ("mlp_norm", "silu")):
            assert len({steps[f"layers.{layer}.{kind}"] for kind in pair}) == 1
    assert len({steps[name] for name in steps if name.endswith(("o_proj_in", "down_proj_in"))}) == 1


def test_budget_model_builds_and_inspects_per_site_timesteps(budgeted, tmp_path):
    root, path = budgeted
    record = modelfile.load(path)
    result = _invoke("inspect", path, "--json", tmp_path / "summary.json")
    assert result.exit_code == 0, result.output
    sites = {site["site"]: site for site in json.loads((tmp_path / "summary.json").read_text())["sites"]}
    assert {name: site["T"] for name, site in sites.items()} == record["budget"]["timesteps"]
    assert all(site["K"] == 0 and site["coding"] == "phase" for site in sites.values())
    out = root / "sim"
    result = _invoke("build", path, "--target", "sim", "-o", out, "--text", root / "calib.txt", "--windows", "2",
                     "--seqlen", "64", "--no-progress")
    assert result.exit_code == 0, result.output
    run = json.loads((out / "sim.json").read_text())
    assert {name: site["timesteps"] for name, site in run["sites"].items()} == record["budget"]["timesteps"]
    from backends.sim.measure import load_run
    from backends.sim.results import Counts

    measured, _ = load_run(out / "sim.json")
    snn, ann = (sum(counts.values(), Counts()) for counts in (measured.snn, measured.ann))
    # the simulator's own counters on the calibration text: within the budget up to the calibration
    # samples' estimate of the firing rates
    assert snn.ac / ann.mac <= BUDGET * 1.05, snn.ac / ann.mac
    result = _invoke("eval", path, "--ppl", root / "calib.txt", "--seqlen", "64", "--max-windows", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    top = max(record["budget"]["timesteps"].values())
    assert f"T=per site (budget, at most {top})" in result.output  # not one T the model does not run at


def test_budget_model_zeroshot_header_says_per_site(budgeted, tmp_path):
    """zeroshot names a budget model's T as eval does: per site, at most the largest (not the coding's nominal T)."""
    pytest.importorskip("lm_eval", reason="lm-eval (the eval extra) is not installed")
    root, path = budgeted
    words = synthetic_text(words=60, seed=5).split()
    records = [{"query": " ".join(words[i:i + 5]), "choices": [words[i + 6], words[i + 7]], "gold": i % 2}
               for i in range(0, 30, 10)]
    tasks = tmp_path / "mc.jsonl"
    tasks.write_text("".join(json.dumps(record) + "\n" for record in records))
    result = _invoke("zeroshot", path, "--task", f"mc={tasks}", "--json", tmp_path / "zeroshot.json")
    assert result.exit_code == 0, result.output
    top = max(modelfile.load(path)["budget"]["timesteps"].values())
    assert f"T=per site (budget, at most {top})" in result.output
    assert json.loads((tmp_path / "zeroshot.json").read_text())["budget"]["kind"] == "spikes_per_mac"


@pytest.mark.parametrize("extra, needle", [
    (["--spikes-per-mac", "0.5"], "--spikes-per-mac 0.5: infeasible"),
    (["--energy-budget", "0.5", "-T", "8"], "--energy-budget chooses each site's T"),
    (["--energy-budget", "0.5", "--spikes-per-mac", "2"], "--energy-budget and --spikes-per-mac"),
    (["--spikes-per-mac", "0"], "--spikes-per-mac 0.0: must be a number > 0"),
    (["--spikes-per-mac", "2", "--coding", "las"], "--spikes-per-mac: per-site budgets"),
])
def test_budget_bad_inputs(tmp_path, extra, needle):
    folder, text = _workspace(tmp_path)
    output = tmp_path / "bad.pt"
    result = _invoke("convert", folder, "-o", output, "--calib", text, *FAST_CONVERT, *extra)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and needle in result.output and result.output.count("\n") == 1
    assert not output.exists()


def test_streamed_sensitivities_are_the_whole_model_fisher(budgeted):
    """The conversion computes each site's Fisher one decoder layer at a time, backward, on the hidden states it
    kept (conversion.convert.fisher_streamed); the same model in memory (rotated, sites off, after the KV prefix),
    back-propagated whole by budget.site_fisher, gives the same values."""
    from spikecompile.conversion.budget import site_fisher
    from spikecompile.conversion.convert import load_spiking_model
    from spikecompile.data import load_text, token_windows

    root, path = budgeted
    spiking = load_spiking_model(str(path))
    assert spiking.prefix is not None  # the prefix's keys and values are part of the forward differentiated
    spiking.sites.set_mode("off")
    text = load_text(str(root / "calib.txt"), split="calib")
    windows = token_windows(spiking.tokenizer, text, 64, 2, "calibration")
    whole = site_fisher(spiking.logits, spiking.sites, spiking.model.get_input_embeddings(), windows)
    streamed = torch.tensor([spiking.record["budget"]["fisher"][name] for name in spiking.sites], dtype=torch.float64)
    assert (whole > 0).all()
    assert torch.allclose(streamed, whole, rtol=1e-6, atol=0), (streamed / whole).tolist()
