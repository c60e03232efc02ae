"""The ledger's second baselines (issue 16, item 7): the int8-ANN column and the loihi2 energy target, priced from a
tiny model's counts by hand, and shown by `build --target sim` and `report`."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import convert_tiny

from spikecompile.backends.sim import simulate
from spikecompile.backends.sim.ledger import ledger, tier_energies
from spikecompile.backends.sim.results import Counts
from spikecompile.build import BuildOptions, build
from spikecompile.cli import cli
from spikecompile.errors import SpikecompileError
from spikecompile.hardware.energy import STATUSES, load_target, packaged_targets
from spikecompile.hardware.loihi2 import load_loihi2
from spikecompile.ir import ActivationMatmul, Linear

LOIHI2 = Path(__file__).parent.parent / "targets" / "loihi2.toml"


def _invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny model built and simulated on one window of 24 tokens: (graph, run)."""
    built = build(convert_tiny(tmp_path_factory.mktemp("baselines")), BuildOptions())
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    return built.graph, simulate(built.graph, built.store, ids, "decoded")


def test_int8_macs_are_exactly_the_matmul_macs(tiny_run):
    """Every Linear's and activation matmul's ANN MACs are int8 MACs (a Linear's: tokens · in · out); no other
    node has any, and the SNN none."""
    graph, run = tiny_run
    linears = 0
    for name, counts in run.ann.items():
        node = graph[name]
        if isinstance(node, Linear):
            linears += 1
            assert counts.int8_mac == counts.mac == run.tokens * node.in_features * node.out_features, name
        elif isinstance(node, ActivationMatmul):
            assert counts.int8_mac == counts.mac > 0, name
        else:
            assert counts.int8_mac == 0, name
        assert counts.reads >= 2 * counts.int8_mac and run.snn[name].int8_mac == 0, name
    assert linears >= 7 * 2  # q, k, v, o, gate, up, down per layer


def hand_tiers(counts: Counts, mac, ac, read, write, neuron, mac8=None, read8=None, synop=None) -> dict:
    """The three tiers in pJ, written out term by term from the constants' values."""
    int8 = counts.int8_mac if mac8 is not None else 0.0
    synops = counts.spike_reads if synop is not None else 0.0
    compute = mac * (counts.mac - int8) + (mac8 or 0.0) * int8 + ac * (counts.ac - synops) + (synop or 0.0) * synops
    with_neurons = compute + neuron * counts.neuron_steps
    memory = (with_neurons + read * (counts.reads - 2 * int8) + (read8 or 0.0) * 2 * int8 + read / 32 * counts.spike_reads
              + write * counts.writes + write / 32 * counts.spike_writes)
    return {"compute": compute, "neuron": with_neurons, "memory": memory}


def test_int8_column_priced_by_hand_from_the_tiny_models_counts(tiny_run):
    _, run = tiny_run
    result = ledger(run, load_target("cmos45nm"))
    total = result["total"]
    ann, snn = (Counts(**total["counts"][side]) for side in ("ann", "snn"))
    fp32 = hand_tiers(ann, 4.6, 0.9, 5.0, 5.0, 10.9)
    int8 = hand_tiers(ann, 4.6, 0.9, 5.0, 5.0, 10.9, mac8=0.3, read8=1.25)
    spiking = hand_tiers(snn, 4.6, 0.9, 5.0, 5.0, 10.9)
    for tier in ("compute", "neuron", "memory"):
        assert total["ann"]["per_sequence"][tier] == pytest.approx(fp32[tier] * 1e-12, rel=1e-12)
        assert total["ann_int8"]["per_sequence"][tier] == pytest.approx(int8[tier] * 1e-12, rel=1e-12)
        assert total["snn"]["per_sequence"][tier] == pytest.approx(spiking[tier] * 1e-12, rel=1e-12)
        assert total["ann_int8"]["per_token"][tier] == pytest.approx(int8[tier] * 1e-12 / run.tokens, rel=1e-12)
        assert total["snn_over_ann_int8"][tier] == pytest.approx(spiking[tier] / int8[tier], rel=1e-12)
        # the int8 ANN is the cheaper baseline, so the SNN's ratio against it is the larger one
        assert total["ann_int8"]["per_sequence"][tier] < total["ann"]["per_sequence"][tier]
        assert total["snn_over_ann_int8"][tier] > total["snn_over_ann"][tier]
    # consistent per layer: the layers' int8 energies sum to the total's
    for tier in ("compute", "memory"):
        layers = sum(entry["ann_int8"]["per_sequence"][tier] for entry in result["layers"])
        assert layers == pytest.approx(total["ann_int8"]["per_sequence"][tier], rel=1e-12)
    assert "int8 ANN column" in result["convention"] and "E_MAC8 = 0.3 pJ (8-bit) [estimate]" in result["convention"]


def test_int8_pricing_of_one_node_by_hand():
    """One Linear of 3 tokens × 4 in × 5 out with 5 bias adds: MACs 60, reads 2·60 + 2·5, writes 15."""
    counts = Counts(mac=60, ac=5, reads=130, writes=15, int8_mac=60)
    target = load_target("cmos45nm")
    assert tier_energies(counts, target, int8=True) == pytest.approx(
        {"compute": 0.3 * 60 + 0.9 * 5, "neuron": 0.3 * 60 + 0.9 * 5,
         "memory": 0.3 * 60 + 0.9 * 5 + 1.25 * 120 + 5.0 * 10 + 5.0 * 15})
    assert tier_energies(counts, target)["compute"] == pytest.approx(4.6 * 60 + 0.9 * 5)


def test_loihi2_target_loads_each_constant_with_source_and_status():
    target = load_target("loihi2")
    assert target.file == "targets/loihi2.toml" and "loihi2" in packaged_targets()
    assert load_target(LOIHI2).constants == target.constants
    assert (target.synop.pj, target.synop.status) == (23.6, "pre-silicon")
    assert (target.neuron.pj, target.neuron.status) == (81.0, "pre-silicon")
    assert "Davies et al., IEEE Micro 38(1), 2018, Table 2" in target.synop.source
    for constant in target.constants.values():
        assert constant.status in STATUSES and constant.source.strip() and constant.unit == "pJ"
    assert load_loihi2().limits["cores_per_chip"] == 128  # the mapping's reader still reads the same file


def test_loihi2_prices_spike_driven_accumulates_as_synops(tiny_run):
    _, run = tiny_run
    total = ledger(run, load_target("loihi2"))["total"]
    snn, ann = (Counts(**total["counts"][side]) for side in ("snn", "ann"))
    assert snn.spike_reads > 0
    spiking = hand_tiers(snn, 4.6, 0.9, 5.0, 5.0, 81.0, synop=23.6)
    int8 = hand_tiers(ann, 4.6, 0.9, 5.0, 5.0, 81.0, mac8=0.3, read8=1.25)
    for tier in ("compute", "neuron", "memory"):
        assert total["snn"]["per_sequence"][tier] == pytest.approx(spiking[tier] * 1e-12, rel=1e-12)
        assert total["ann_int8"]["per_sequence"][tier] == pytest.approx(int8[tier] * 1e-12, rel=1e-12)


@pytest.mark.parametrize("change, message", [
    ({"mac_int8": None}, "constants.mac_int8 missing: the int8 ANN baseline needs both mac_int8 and read_int8"),
    ({"synop.status": "simulated"}, "constants.synop.status 'simulated' unknown: give measured, pre-silicon, estimate"),
])
def test_bad_loihi2_edits_are_one_line_errors(tmp_path, change, message):
    import tomllib

    document = tomllib.loads(LOIHI2.read_text())
    for key, value in change.items():
        name, _, field = key.partition(".")
        if field:
            document["constants"][name][field] = value
        else:
            document["constants"].pop(name)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(document))
    with pytest.raises(SpikecompileError) as caught:
        load_target(edited)
    assert str(caught.value) == f"{edited}: {message}"


def test_int8_constant_of_another_width_is_refused(tmp_path, tiny_run):
    import tomllib

    document = tomllib.loads(LOIHI2.read_text())
    document["constants"]["read_int8"]["bits"] = 16
    edited = tmp_path / "wide.json"
    edited.write_text(json.dumps(document))
    with pytest.raises(SpikecompileError, match=r"constants.read_int8.bits is 16: the ledger counts 8-bit"):
        ledger(tiny_run[1], load_target(edited))


def test_sim_build_and_report_show_the_int8_column_and_take_loihi2(tmp_path):
    model = convert_tiny(tmp_path)
    out = tmp_path / "sim"
    result = _invoke("build", model, "--target", "sim", "-o", out, "--text", tmp_path / "calib.txt",
                     "--windows", "1", "--seqlen", "16", "--mode", "decoded", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.output.count("   ANN int8 ") == 3 and result.output.count("SNN/ANN int8 ") == 3
    saved = json.loads((out / "sim.json").read_text())
    report = json.loads((out / "report.json").read_text())["ledger"]["total"]
    assert saved["energy"]["target"] == "cmos45nm"
    assert saved["energy"]["ann_int8"] == report["ann_int8"]
    assert saved["energy"]["snn_over_ann_int8"] == report["snn_over_ann_int8"]
    assert "| ANN int8 per sequence |" in (out / "report.md").read_text()
    again = _invoke("report", out / "sim.json", "-o", tmp_path / "loihi", "--energy-target", "loihi2")
    assert again.exit_code == 0, again.output
    loihi = json.loads((tmp_path / "loihi" / "report.json").read_text())["ledger"]
    assert loihi["target"]["name"] == "loihi2"
    assert loihi["target"]["constants"]["synop"]["status"] == "pre-silicon"
    markdown = (tmp_path / "loihi" / "report.md").read_text()
    assert "E_synop = 23.6 pJ (8-bit) [pre-silicon]" in markdown and "SNN / ANN int8" in markdown
    assert (tmp_path / "loihi" / "energy.png").read_bytes()[:4] == b"\x89PNG"
