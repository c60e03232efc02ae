"""The accuracy–energy frontier (issue 16, item 5): points measured by the simulator and eval on the same windows,
priced by the ledger, each cost's Pareto set, the published points, and `spikecompile frontier`'s files."""

import json

import pytest
from click.testing import CliRunner
from conftest import convert_tiny
from PIL import Image

from spikecompile.backends.sim.frontier import COSTS, PUBLISHED, FrontierPoint, measured_point, pareto
from spikecompile.backends.sim.ledger import ledger
from spikecompile.backends.sim.measure import load_run
from spikecompile.cli import cli
from spikecompile.hardware.energy import load_target

WINDOWS, SEQLEN = 2, 48


def _invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def _measure(root, name, *convert_options, sim_options=(), tag=None):
    """(sim.json, eval.json) of one tiny conversion, both on the same WINDOWS × SEQLEN of the calibration text."""
    model = root / f"{name}.pt"
    if not model.exists():
        convert_tiny(root, name, *convert_options)
    text = root / "calib.txt"
    tag = tag or name
    sim = root / f"{tag}-sim"
    result = _invoke("build", model, "--target", "sim", "-o", sim, "--mode", "decoded", "--text", text,
                     "--windows", WINDOWS, "--seqlen", SEQLEN, "--no-progress", *sim_options)
    assert result.exit_code == 0, result.output
    evaluation = root / f"{tag}-eval.json"
    result = _invoke("eval", model, "--ppl", text, "--seqlen", SEQLEN, "--max-windows", WINDOWS, "--no-progress",
                     "--json", evaluation)
    assert result.exit_code == 0, result.output
    return sim / "sim.json", evaluation


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    return root, {"T=6": _measure(root, "t6"), "T=4": _measure(root, "t4", "-T", "4"),
                  "T=6 mask 2": _measure(root, "t6", sim_options=("--mask-steps", "2"), tag="t6-mask")}


def test_a_point_is_the_simulated_perplexity_over_evals_baselines_and_the_ledgers_costs(measured):
    _, files = measured
    sim, evaluation = files["T=6"]
    target = load_target("cmos45nm")
    point = measured_point("T=6", sim, evaluation, target)
    run, meta = load_run(sim)
    figures = json.loads(evaluation.read_text())
    assert point.snn_ppl == meta["ppl"]
    assert point.ppl_ratio == pytest.approx(meta["ppl"] / figures["ann_ppl"], rel=1e-12)
    assert point.ppl_ratio_prefixed == pytest.approx(meta["ppl"] / figures["prefixed_float_ppl"], rel=1e-12)
    # the simulator's decoded IR and eval's rebuilt model are two runs of the same spiking model
    assert point.snn_ppl == pytest.approx(figures["snn_ppl"], rel=1e-3)
    snn_ac = sum(counts.ac for counts in run.snn.values())
    ann_mac = sum(counts.mac for counts in run.ann.values())
    assert point.costs["acs_per_mac"] == pytest.approx(snn_ac / ann_mac, rel=1e-12) and snn_ac > 0
    total = ledger(run, target, "causal")["total"]
    for tier in ("compute", "neuron", "memory"):
        assert point.costs[tier] == pytest.approx(total["snn_over_ann"][tier], rel=1e-12)
        assert point.energy_per_token_j[tier] == pytest.approx(total["snn"]["per_token"][tier], rel=1e-12)


def test_fewer_timesteps_and_masking_cost_less(measured):
    _, files = measured
    target = load_target("cmos45nm")
    t6, t4, masked = (measured_point(label, *files[label], target) for label in ("T=6", "T=4", "T=6 mask 2"))
    for cost in COSTS:
        assert t4.costs[cost] < t6.costs[cost]
    assert masked.costs["acs_per_mac"] < t6.costs["acs_per_mac"]
    assert masked.settings["mask_steps"] == 2 and t6.settings["mask_steps"] is None


def _point(label, cost, ratio):
    return FrontierPoint(label=label, model="m", ppl_ratio=ratio, ppl_ratio_prefixed=ratio,
                         costs=dict.fromkeys(COSTS, cost))


def test_pareto_keeps_exactly_the_undominated_points():
    points = [_point("a", 1.0, 1.30), _point("b", 2.0, 1.10), _point("c", 2.5, 1.20), _point("d", 3.0, 1.00),
              _point("e", 3.0, 1.05), _point("f", 1.0, 1.40)]
    front = {point.label for point in pareto(points, "compute")}
    brute = {p.label for p in points
             if not any(q is not p and q.costs["compute"] <= p.costs["compute"]
                        and q.ppl_ratio_prefixed <= p.ppl_ratio_prefixed
                        and (q.costs["compute"], q.ppl_ratio_prefixed) != (p.costs["compute"], p.ppl_ratio_prefixed)
                        for q in points)}
    assert front == brute == {"a", "b", "d"}
    assert all(point not in pareto([*points, *PUBLISHED], "compute") for point in PUBLISHED)


def test_frontier_cli_writes_table_plot_and_json(measured):
    root, files = measured
    arguments = [argument for label, (sim, evaluation) in files.items()
                 for argument in ("--point", label, sim, evaluation)]
    out = root / "frontier-out"
    result = _invoke("frontier", *arguments, "-o", out)
    assert result.exit_code == 0, result.output
    document = json.loads((out / "frontier.json").read_text())
    labels = [entry["label"] for entry in document["points"]]
    assert labels[:3] == list(files) and set(labels[3:]) == {point.label for point in PUBLISHED}
    target = load_target("cmos45nm")
    points = [measured_point(label, *files[label], target) for label in files]
    for cost in COSTS:
        assert document["pareto"][cost] == [point.label for point in pareto(points, cost)]
        assert document["pareto"][cost]  # a set of measured points is never without a frontier
    table = (out / "frontier.md").read_text()
    for point in points:
        row = next(line for line in table.splitlines() if line.startswith(f"| {point.label} |"))
        assert f"{point.ppl_ratio_prefixed:.4f}" in row and f"{point.costs['acs_per_mac']:.3f}" in row
    assert "other models" in table and "SDLLM" in table
    with Image.open(out / "frontier.png") as image:
        assert image.size[0] > 600 and image.size[1] > 600


def test_one_eval_serves_every_conversion_of_the_source_with_that_prefix(measured):
    _, files = measured
    sim6, eval6 = files["T=6"]
    _, eval4 = files["T=4"]
    target = load_target("cmos45nm")
    own, shared = measured_point("x", sim6, eval6, target), measured_point("x", sim6, eval4, target)
    # the baselines do not depend on the spike sites: T=4's eval gives T=6's ANN and prefixed float model exactly
    assert (own.ann_ppl, own.prefixed_float_ppl) == (shared.ann_ppl, shared.prefixed_float_ppl)
    assert own == shared


def test_frontier_refuses_measurements_that_do_not_belong_together(measured):
    root, files = measured
    sim6, eval6 = files["T=6"]
    _, unprefixed = _measure(root, "noprefix", "--prefix", "none")
    result = _invoke("frontier", "--point", "x", sim6, unprefixed, "-o", root / "bad")
    assert result.exit_code != 0 and "KV prefix" in result.output and str(unprefixed) in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (root / "bad").exists()
    other = root / "other-windows.json"
    other.write_text(json.dumps({**json.loads(eval6.read_text()), "windows": WINDOWS + 1}))
    result = _invoke("frontier", "--point", "x", sim6, other, "-o", root / "bad")
    assert result.exit_code != 0 and "windows" in result.output and not (root / "bad").exists()
    result = _invoke("frontier", "--point", "x", sim6, eval6, "--point", "x", sim6, eval6, "-o", root / "bad")
    assert result.exit_code != 0 and "--point x" in result.output and not (root / "bad").exists()
    missing = root / "missing.json"
    result = _invoke("frontier", "--point", "x", sim6, missing, "-o", root / "bad")
    assert result.exit_code != 0 and str(missing) in result.output



def test_ratios_above_the_cap_are_drawn_at_it_with_their_value():
    """A coding that loses the model (ratio 1000) is drawn at RATIO_CAP as ▲ and labelled with its ratio, so the
    usable points keep a linear axis; points under the cap are drawn where they are."""
    from spikecompile.backends.sim.frontier import RATIO_CAP, frontier_figure

    costs = {"acs_per_mac": 2.0, "compute": 0.5, "neuron": 0.55, "memory": 0.9}
    points = [FrontierPoint("usable", "m", 1.01, 1.02, costs),
              FrontierPoint("collapsed", "m", 1000.0, 1012.5, {cost: value + 0.1 for cost, value in costs.items()})]
    figure = frontier_figure(points, published=False)
    for ax in figure.axes:
        assert ax.get_yscale() == "linear"
        drawn = sorted(float(y) for collection in ax.collections for _, y in collection.get_offsets())
        assert drawn == [1.01, 1.02, RATIO_CAP, RATIO_CAP]
        texts = [text.get_text() for text in ax.texts]
        assert "usable" in texts and "collapsed: ratio 1.01e+03" in texts
