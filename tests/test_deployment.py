"""The Loihi 2 deployment report (passes/deployment.py): formats, worst-case accumulator headroom, saturations on
calibration data, the fixed-point perplexity, and the accumulator overflow refused unless --allow-saturation —
through `build --target lava`, `build --target sim --numerics loihi2` and `inspect --formats loihi2`."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import convert_tiny, synthetic_text

from spikecompile.build import BuildOptions, build
from spikecompile.cli import cli
from spikecompile.errors import SpikecompileError
from spikecompile.hardware.loihi2 import SiteFormat, SynapseFormat, load_loihi2
from spikecompile.passes.deployment import (
    CalibrationRun, check_overflow, code_peak, sample_saturation, synapse_entry,
)
from spikecompile.passes.loihi_mapping import deployed_formats


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return convert_tiny(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="module")
def built(model):
    return build(model, BuildOptions())


def planted_site(payload, max_spikes=0) -> SiteFormat:
    size = len(payload)
    return SiteFormat("planted", 24, 20, 2.0 ** -20, np.zeros(size, dtype=np.int64), np.ones(size, dtype=np.int64),
                      np.asarray(payload, dtype=np.int64), 0.5, 24, max_spikes)


def test_headroom_is_the_hand_computed_worst_case():
    mantissa = np.array([[127, -127, 0], [1, 2, 3]], dtype=np.int8)
    synapse = SynapseFormat("planted", 8, mantissa, np.ones(2), 24)
    # row 0: 2·(127 + 127) = 508; a source neuron sends at most 4 + 2 + 1 = 7, or 4 with a budget of one spike
    entry = synapse_entry(synapse, planted_site([4, 2, 1]))
    assert entry["window_peak"] == 508 * 7 and entry["step_peak"] == 508 * 4
    assert entry["headroom_bits"] == pytest.approx(math.log2(2 ** 23 - 1) - math.log2(3556))
    assert code_peak(planted_site([4, 2, 1], max_spikes=1)) == 4
    assert synapse_entry(synapse, planted_site([4, 2, 1], max_spikes=1))["window_peak"] == 508 * 4


def test_a_planted_calibration_sample_beyond_the_state_saturates(built):
    formats = deployed_formats(built.graph, built.store)
    name, site = next(iter(formats.sites.items()))
    planted = torch.tensor([0.0, 3.0 * site.limit * site.unit, -3.0 * site.limit * site.unit, 0.5 * site.unit])
    found = sample_saturation(built.graph, formats, {site.site: planted})
    assert found == {site.site: {"saturated": 2, "samples": 4}}


def test_an_overflowing_accumulator_is_refused_unless_saturation_is_allowed(built):
    target = load_loihi2()
    narrow = dataclasses.replace(target, limits={**target.limits, "accumulator_bits": 10})
    run = CalibrationRun(built.graph, built.store, deployed_formats(built.graph, built.store, narrow))
    run(torch.randint(3, 120, (1, 16), generator=torch.Generator().manual_seed(0)))
    synapses = run.report()["synapses"]
    over = [name for name, entry in synapses.items() if entry["overflowed"]]
    assert over and all(synapses[name]["peak"] > 511 for name in over)
    assert all(entry["peak"] <= 511 for name, entry in synapses.items() if name not in over)
    with pytest.raises(SpikecompileError, match=f"matrix {over[0]}: its 10-bit accumulator overflows on "
                                                f"{synapses[over[0]]['overflowed']} of .*--allow-saturation"):
        check_overflow(synapses, False, "planted")
    check_overflow(synapses, True, "planted")  # allowed: reported, not refused


def test_lava_build_reports_formats_headroom_saturation_and_perplexity(model, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(synthetic_text(seed=3))
    out = tmp_path / "mlp"
    result = CliRunner().invoke(cli, ["build", str(model), "--target", "lava", "-o", str(out), "--block", "mlp",
                                      "--text", str(text), "--seqlen", "32", "--windows", "2"])
    assert result.exit_code == 0, result.output
    assert "least worst-case headroom" in result.output and "accumulator overflows none" in result.output
    assert "fixed-point perplexity (whole model, Loihi 2 fixed point)" in result.output
    readme = (out / "README.md").read_text()
    assert "synapse layers.0.mlp.down_proj" in readme and "bit-exact" in readme and "flip allowance" not in readme
    ppl = float(result.output.split("fixed-point perplexity (whole model, Loihi 2 fixed point): ")[1].split()[0])
    assert 1 < ppl < 10 * 128


def test_sim_loihi2_reports_saturations_in_sim_json(model, tmp_path):
    out = tmp_path / "sim"
    result = CliRunner().invoke(cli, ["build", str(model), "--target", "sim", "-o", str(out), "--numerics", "loihi2",
                                      "--windows", "1", "--seqlen", "16", "--mode", "decoded", "--no-progress",
                                      "--allow-saturation"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "sim.json").read_text())["meta"]
    synapses = meta["loihi2"]["synapses"]
    assert synapses and all(entry["sums"] > 0 and entry["peak"] <= entry["limit"] for entry in synapses.values())
    assert "accumulator overflows none" in result.output


def test_an_option_of_another_target_still_fails(model, tmp_path):
    result = CliRunner().invoke(cli, ["build", str(model), "--target", "nir", "-o", str(tmp_path / "n"),
                                      "--allow-saturation"])
    assert result.exit_code == 2 and "--allow-saturation: an option of --target sim" in result.output


def test_inspect_states_the_formats(model, tmp_path):
    result = CliRunner().invoke(cli, ["inspect", str(model), "--formats", "loihi2", "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert "Loihi 2 deployed formats" in result.output and "headroom" in result.output
    assert "on the stored calibration samples: potential saturations" in result.output
    summary = json.loads((tmp_path / "s.json").read_text())["loihi2"]
    assert summary["formats"]["ops"]["Nonlinear"]["where"] == "host CPU"
    entry = summary["formats"]["synapses"]["layers.0.mlp.down_proj"]
    assert entry["weight_bits"] == 8 and entry["accumulator_bits"] == 24 and entry["row_scales"] == entry["shape"][0]
