"""The Loihi 2 deployment report (passes/deployment.py): formats, worst-case accumulator headroom, saturations on
calibration data, the fixed-point perplexity, and the accumulator overflow refused unless --allow-saturation —
through `build --target lava`, `build --target sim --numerics loihi2` and `inspect --formats loihi2`."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import convert_tiny, synthetic_text

from spikecompile.backends.sim.simulate import output_of, run
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
    assert "payload grids: fitted on 2 calibration windows (1 bit of accumulator headroom)" in result.output
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


# ---- payload grids fitted on calibration data, and custom targets through the CLI ---------------------------------

def narrow_target(tmp_path, **limits) -> str:
    """targets/loihi2.toml with some [limits.X] values replaced, written to a file; its path."""
    from spikecompile.hardware.files import packaged_target

    _, text = packaged_target("loihi2.toml")
    for name, value in limits.items():
        text, count = re.subn(rf"(\[limits\.{name}\]\s*\nvalue = )\d+", rf"\g<1>{value}", text)
        assert count == 1, name
    path = tmp_path / f"loihi2-{'-'.join(f'{k}{v}' for k, v in limits.items())}.toml"
    path.write_text(text)
    return str(path)


def test_payload_grids_are_fitted_until_the_calibration_sums_fit_with_headroom(built):
    """With a 20-bit accumulator the tiny model's window sums overflow at the most payload fraction bits; the fit
    lowers the bits of the sites that feed them until every peak on the calibration windows is ≤ 2^18, and the
    fitted model still tracks the float one."""
    from spikecompile.passes.deployment import HEADROOM_BITS, fit_payload_grids
    from spikecompile.hardware.loihi2 import PAYLOAD_FRACTION_BITS

    target = load_loihi2()
    narrow = dataclasses.replace(target, limits={**target.limits, "accumulator_bits": 20})
    windows = [torch.randint(3, 120, (1, 32), generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    before = CalibrationRun(built.graph, built.store, deployed_formats(built.graph, built.store, narrow))
    for window in windows:
        before(window)
    assert any(count for count in before.overflowed.values())
    fitted = fit_payload_grids(built.graph, built.store, narrow, windows)
    assert fitted and all(0 <= bits < PAYLOAD_FRACTION_BITS for bits in fitted.values())
    formats = deployed_formats(built.graph, built.store, narrow, fitted)
    after = CalibrationRun(built.graph, built.store, formats)
    logits = [after(window) for window in windows]
    assert max(after.peak.values()) <= 2 ** (20 - 1 - HEADROOM_BITS)
    assert sum(after.overflowed.values()) == 0
    lowered = {formats.sources[name] for name, peak in before.peak.items() if peak > 2 ** (20 - 1 - HEADROOM_BITS)}
    assert lowered <= set(fitted)
    floating = [output_of(built.graph, run(built.graph, built.store, window, "decoded")).double() for window in windows]
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(logits, floating)) < 0.15


@pytest.mark.parametrize("target", ["sim", "lava"])
def test_a_target_file_whose_accumulator_overflows_is_refused_naming_the_matrix(model, tmp_path, target):
    """--loihi2-target with a 9-bit accumulator: even at 0 payload fraction bits the calibration sums overflow, so
    the build fails in one line naming the matrix and writes nothing; with --allow-saturation it is reported."""
    narrow = narrow_target(tmp_path, accumulator_bits=9)
    out = tmp_path / f"out-{target}"
    extra = ["--numerics", "loihi2", "--windows", "1", "--seqlen", "16", "--mode", "decoded"] if target == "sim" \
        else ["--block", "mlp"]
    command = ["build", str(model), "--target", target, "-o", str(out), "--loihi2-target", narrow, "--no-progress",
               *extra]
    refused = CliRunner().invoke(cli, command)
    assert refused.exit_code == 2, refused.output
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: matrix layers.") and "9-bit accumulator overflows" in \
        lines[0] and "--allow-saturation" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(f".out-{target}*"))
    allowed = CliRunner().invoke(cli, [*command, "--allow-saturation"])
    assert allowed.exit_code == 0, allowed.output
    assert "accumulator overflows" in allowed.output and "accumulator overflows none" not in allowed.output


@pytest.mark.parametrize("limits, fault", [
    ({"weight_bits": 12}, "matrix layers.0.self_attn.q_proj: .*weight_bits 12"),
    ({"state_bits": 8}, "site layers.0.attn_norm: the 8-bit potential leaves .* fewer than T = 6"),
])
def test_a_target_file_the_model_cannot_be_deployed_on_is_refused_and_nothing_is_written(model, tmp_path, limits,
                                                                                         fault):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["build", str(model), "--target", "lava", "-o", str(out), "--loihi2-target",
                                      narrow_target(tmp_path, **limits), "--no-progress"])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert re.match(f"error: {fault}", line), line
    assert not out.exists()


def test_a_damaged_target_file_and_a_float_sim_with_a_target_are_refused(model, tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[limits.weight_bits]\nvalue = 8\n")
    for command, fault in (
            (["--target", "lava", "--loihi2-target", str(broken)], "broken.toml: .*must give"),
            (["--target", "sim", "--loihi2-target", str(broken)], "--loihi2-target .*add --numerics loihi2")):
        result = CliRunner().invoke(cli, ["build", str(model), "-o", str(tmp_path / "out"), *command])
        assert result.exit_code == 2 and re.search(fault, result.output), result.output
        assert len([line for line in result.output.splitlines() if line.strip()]) == 1
