"""`spikecompile build --target sim` and `spikecompile report` (measured and analytic), end to end."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import convert_tiny, tiny_llama_config

import spikecompile.targets
from spikecompile.cli import cli


def _invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    root = tmp_path_factory.mktemp("simcli")
    model = convert_tiny(root)
    text = root / "calib.txt"
    out = root / "sim"
    result = _invoke("build", model, "--target", "sim", "-o", out, "--text", text, "--windows", "2", "--seqlen", "32",
                     "--no-progress")
    assert result.exit_code == 0, result.output
    return root, model, out, result.output


def test_build_sim_writes_the_run_and_the_report(simulated):
    _, _, out, output = simulated
    assert {"sim.json", "report.json", "report.md", "energy.png", "firing_rate.png"} <= {p.name for p in out.iterdir()}
    run = json.loads((out / "sim.json").read_text())
    assert run["meta"]["windows"] == 2 and run["tokens"] == 32 and run["meta"]["mode"] == "event"
    assert "perplexity" in output and "SNN/ANN" in output
    report = json.loads((out / "report.json").read_text())
    tiers = report["ledger"]["total"]["snn"]["per_token"]
    assert 0 < tiers["compute"] <= tiers["neuron"] <= tiers["memory"]
    assert report["ledger"]["attention"] == "causal" and report["tokens"] == 32


def test_report_with_a_site_histogram(simulated, tmp_path):
    root, model, out, _ = simulated
    result = _invoke("report", out / "sim.json", "-o", tmp_path / "r", "--site", "layers.1.silu", "--model", model)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analytic_report_from_a_config_and_measured_rates(simulated, tmp_path):
    _, _, out, _ = simulated
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**tiny_llama_config().to_dict(), "num_hidden_layers": 3}))
    result = _invoke("report", "--config", config, "--rates", out / "sim.json", "--seq-len", "48", "-T", "6",
                     "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert [entry["layer"] for entry in report["ledger"]["layers"]] == [0, 1, 2, None]  # the config's 3 layers
    assert report["tokens"] == 48
    measured = json.loads((out / "sim.json").read_text())["sites"]
    silu = [site["firing_rate"] for name, site in report["sites"].items() if name.endswith(".silu")]
    spikes = sum(sum(site["spikes_per_step"]) for name, site in measured.items() if name.endswith(".silu"))
    steps = sum(site["elements"] * site["timesteps"] for name, site in measured.items() if name.endswith(".silu"))
    assert silu == pytest.approx([spikes / steps] * 3)  # the measured rate of the kind, at every layer


BAD = [
    (["report", "{model}", "-o", "{tmp}/x"], "a model.pt holds no simulation run"),
    (["report", "{out}/sim.json", "-o", "{tmp}/x", "--site", "layers.0.q", "--model", "{other}"],
     "the run was measured on another model"),
    (["report", "{out}/sim.json", "-o", "{tmp}/x", "--energy-target", "{bad_target}"], "constants.mac.unit missing"),
    (["report", "--config", "{config}", "--rate", "q=0.1", "-o", "{tmp}/x"], "no rate for site kind"),
    (["build", "{model}", "--target", "sim", "-o", "{tmp}/x", "--attention", "sparse"], "attention counting 'sparse'"),
    (["report", "{out}/report.json", "-o", "{tmp}/x"], "not a spikecompile simulation run"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_report_input_is_one_line(simulated, tmp_path, args, message):
    root, model, out, _ = simulated
    other = tmp_path / "other.pt"
    other.write_bytes(model.read_bytes() + b"\0")
    bad_target = tmp_path / "bad.toml"
    shipped = (Path(spikecompile.targets.__file__).parent / "cmos45nm.toml").read_text()
    bad_target.write_text(shipped.replace('unit = "pJ"\n', "", 1))  # the first constant, mac, loses its unit
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_llama_config().to_dict()))
    fill = {"model": model, "out": out, "tmp": tmp_path, "other": other, "bad_target": bad_target, "config": config}
    result = _invoke(*[arg.format(**fill) for arg in args])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert message in line


@pytest.mark.parametrize(("edit", "field"), [
    (lambda run: run["snn"][next(iter(run["snn"]))].update(mac="many"), r"snn\.[^:]+\.mac: must be a valid number"),
    (lambda run: run["sites"]["layers.0.q"].update(spikes_per_step=[1.0]),
     r"sites\.layers\.0\.q\.spikes_per_step: has 1 entries, timesteps is 6"),
    (lambda run: run.update(tokens="32"), r"tokens: must be a valid integer"),
    (lambda run: run["meta"].pop("attention"), r"meta\.attention: missing"),
])
def test_damaged_sim_json_is_one_line(simulated, tmp_path, edit, field):
    _, _, out, _ = simulated
    run = json.loads((out / "sim.json").read_text())
    edit(run)
    damaged = tmp_path / "sim.json"
    damaged.write_text(json.dumps(run))
    result = _invoke("report", damaged, "-o", tmp_path / "report")
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert re.search(rf"^error: {damaged}: {field}", line), line
    assert not (tmp_path / "report").exists()


def test_phase_sd_model_simulates_and_its_site_overlay_is_one_error(tmp_path):
    """build --target sim runs a model converted with --coding phase-sd; its report works, but the histogram's level
    overlay (which enumerates the unsigned neuron) refuses a signed-digit site in one line naming --site, and
    leaves no report folder."""
    model = convert_tiny(tmp_path, "sd", "--coding", "phase-sd")
    out = tmp_path / "sim"
    result = _invoke("build", model, "--target", "sim", "-o", out, "--text", tmp_path / "calib.txt", "--windows", "1",
                     "--seqlen", "24", "--no-progress")
    assert result.exit_code == 0, result.output
    run = json.loads((out / "sim.json").read_text())
    assert all(site["firing_rate"] > 0 for site in run["sites"].values())
    assert _invoke("report", out / "sim.json", "-o", tmp_path / "r").exit_code == 0
    bad = _invoke("report", out / "sim.json", "-o", tmp_path / "h", "--site", "layers.1.silu", "--model", model)
    assert bad.exit_code == 2 and not (tmp_path / "h").exists()
    assert re.fullmatch(r"error: --site layers\.1\.silu: a signed-digit site \(--coding phase-sd\).*report without "
                        r"--site\n", bad.output)
