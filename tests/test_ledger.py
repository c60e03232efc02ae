"""Energy ledger (docs/method.md §7): target files, pricing arithmetic, tiers, per token/layer, and the written report."""

import json
import math
from pathlib import Path

import pytest
import torch

from spikecompile.backends.sim.ledger import WORD_BITS, ledger, tier_energies
from spikecompile.backends.sim.report import reachable_levels, write_report
from spikecompile.backends.sim.results import CONVENTION, Counts, SimRun, firing_rates
from spikecompile.errors import SpikecompileError
from spikecompile.hardware.energy import load_target
from spikecompile.neuron import PhaseNeuronParams, base2_params, even_genotype, golden_base2, phase_quantize

SHIPPED = Path(__file__).parent.parent / "targets" / "cmos45nm.toml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIER_ROWS = ("| compute only |", "| + neuron state |", "| + memory traffic |")


def constants_table(**changes) -> dict:
    """The four required constants (45 nm values); changes {"mac.value": x} set a field, None deletes it."""
    table = {name: {"value": value, "unit": "pJ", "bits": 32, "what": f"one {name}", "source": "Horowitz 2014"}
             for name, value in (("mac", 4.6), ("ac", 0.9), ("read", 5.0), ("write", 5.0))}
    for key, value in changes.items():
        name, _, field = key.partition(".")
        if not field:
            table.pop(name) if value is None else table.__setitem__(name, value)
        elif value is None:
            table[name].pop(field)
        else:
            table[name][field] = value
    return table


def toml_value(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return json.dumps(value)


def write_target(folder: Path, table: dict, name="test.toml") -> Path:
    lines = ['name = "test"']
    for constant, entry in table.items():
        lines.append(f"[constants.{constant}]")
        lines += [f"{field} = {toml_value(value)}" for field, value in entry.items()]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def load_error(tmp_path, **changes) -> str:
    path = write_target(tmp_path, constants_table(**changes))
    with pytest.raises(SpikecompileError) as caught:
        load_target(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


# --- targets ---------------------------------------------------------------------------------------------------

def test_shipped_target_loads_by_name_and_path():
    by_name, by_path = load_target("cmos45nm"), load_target(SHIPPED)
    assert by_name.file == "targets/cmos45nm.toml" and by_path.file == str(SHIPPED)
    assert by_name.constants == by_path.constants
    assert {name: c.pj for name, c in by_name.constants.items() if name != "neuron"} == \
        {"mac": 4.6, "ac": 0.9, "read": 5.0, "write": 5.0, "mac_int8": 0.3, "read_int8": 1.25}
    for constant in by_name.constants.values():
        assert constant.unit == "pJ" and constant.bits == (8 if "int8" in constant.name else 32)
        assert constant.source.strip()
    assert by_name.has_int8 and by_name.synop is None
    assert by_name.neuron.pj == pytest.approx(by_name.read.pj + by_name.write.pj + by_name.ac.pj)


@pytest.mark.parametrize("changes, field", [
    ({"ac": None}, "constants.ac missing"),
    ({"mac.value": -4.6}, "constants.mac.value"),
    ({"mac.value": 0}, "constants.mac.value"),
    ({"read.value": float("nan")}, "constants.read.value"),
    ({"read.value": "5"}, "constants.read.value"),
    ({"write.value": None}, "constants.write.value missing"),
    ({"mac.unit": None}, "constants.mac.unit missing"),
    ({"ac.unit": "kWh"}, "constants.ac.unit"),
    ({"ac.unit": "pj"}, "constants.ac.unit"),
    ({"read.bits": 0}, "constants.read.bits"),
    ({"read.bits": 3.5}, "constants.read.bits"),
    ({"read.bits": None}, "constants.read.bits missing"),
    ({"write.source": None}, "constants.write.source missing"),
    ({"write.source": "  "}, "constants.write.source"),
    ({"mac.valeu": 4.6}, "constants.mac.valeu"),
    ({"neuorn": {"value": 1.0, "unit": "pJ", "bits": 32, "source": "x"}}, "constants.neuorn"),
])
def test_bad_constant_is_a_one_line_error_naming_the_field(tmp_path, changes, field):
    assert field in load_error(tmp_path, **changes)


def test_bad_target_files(tmp_path):
    with pytest.raises(SpikecompileError, match="target 'cmos7nm' unknown: give one of cmos45nm"):
        load_target("cmos7nm")
    broken = tmp_path / "broken.toml"
    broken.write_text("[constants.mac\nvalue = 1\n")
    with pytest.raises(SpikecompileError, match=r"broken.toml: not valid TOML"):
        load_target(broken)
    empty = tmp_path / "empty.toml"
    empty.write_text('name = "empty"\n')
    with pytest.raises(SpikecompileError, match="empty.toml: constants table missing"):
        load_target(empty)


def test_units_convert_to_pj_and_json_targets_load(tmp_path):
    table = constants_table(**{"mac.value": 4600, "mac.unit": "fJ", "ac.value": 0.9e-12, "ac.unit": "J",
                               "read.value": 0.005, "read.unit": "nJ"})
    target = load_target(write_target(tmp_path, table))
    assert (target.mac.pj, target.ac.pj, target.read.pj, target.write.pj) == pytest.approx((4.6, 0.9, 5.0, 5.0))
    assert (target.mac.value, target.mac.unit) == (4600, "fJ")
    as_json = tmp_path / "same.json"
    as_json.write_text(json.dumps({"name": "same", "constants": table}))
    assert load_target(as_json).constants == target.constants


def test_neuron_constant_overrides_the_derived_one(tmp_path):
    neuron = {"value": 2.5, "unit": "pJ", "bits": 32, "source": "a datasheet"}
    target = load_target(write_target(tmp_path, constants_table(neuron=neuron)))
    assert target.neuron.pj == 2.5 and target.neuron.source == "a datasheet"
    energies = tier_energies(Counts(neuron_steps=4), target)
    assert energies["neuron"] - energies["compute"] == pytest.approx(4 * 2.5)


# --- ledger ----------------------------------------------------------------------------------------------------

def counts_from(generator, spiking: bool) -> Counts:
    """Random whole-number counts; an ANN node has no neuron steps and no spikes."""
    values = torch.randint(0, 1000, (7,), generator=generator).tolist()
    counts = Counts(*map(float, values))
    return counts if spiking else Counts(mac=counts.mac, ac=counts.ac, reads=counts.reads, writes=counts.writes)


def small_run(tokens=6) -> SimRun:
    generator = torch.Generator().manual_seed(0)
    layers = {"embed": None, "layers.0.q_proj": 0, "layers.0.mlp": 0, "layers.1.q_proj": 1, "lm_head": None}
    snn = {node: counts_from(generator, True) for node in layers}
    ann = {node: counts_from(generator, False) for node in layers}
    sites = {f"layers.{layer}.{kind}": {"layer": layer, "kind": kind, "timesteps": 4, "elements": 10 * (layer + 1),
                                        "spikes_per_step": [3.0 + layer, 2.0, 1.0, float(kind == "silu")],
                                        "firing_rate": 0.0}
             for layer in (0, 1) for kind in ("q", "silu")}
    sites["norm"] = {"layer": None, "kind": "norm", "timesteps": 4, "elements": 5, "spikes_per_step": [1, 0, 0, 0],
                     "firing_rate": 0.05}
    return SimRun(tokens=tokens, snn=snn, ann=ann, layers=layers, sites=sites)


def hand_priced(counts: Counts, target) -> dict[str, float]:
    """The tiers written out term by term, in joules."""
    mac, ac, read, write = (target.mac.pj, target.ac.pj, target.read.pj, target.write.pj)
    compute = mac * counts.mac + ac * counts.ac
    neuron = compute + target.neuron.pj * counts.neuron_steps
    memory = (neuron + read * counts.reads + read / 32 * counts.spike_reads + write * counts.writes
              + write / 32 * counts.spike_writes)
    return {"compute": compute * 1e-12, "neuron": neuron * 1e-12, "memory": memory * 1e-12}


def test_ledger_prices_every_layer_and_the_total_by_the_formulas():
    run, target = small_run(), load_target("cmos45nm")
    result = ledger(run, target)
    assert result["unit"] == "J" and result["tokens"] == 6 and result["attention"] == "causal"
    assert [entry["layer"] for entry in result["layers"]] == [0, 1, None]
    groups = {0: ["layers.0.q_proj", "layers.0.mlp"], 1: ["layers.1.q_proj"], None: ["embed", "lm_head"]}
    for entry in result["layers"] + [result["total"]]:
        nodes = groups[entry["layer"]] if "layer" in entry else list(run.snn)
        for side in ("snn", "ann"):
            counts = sum((getattr(run, side)[node] for node in nodes), Counts())
            assert entry["counts"][side] == counts.to_dict()
            assert entry[side]["per_sequence"] == pytest.approx(hand_priced(counts, target), rel=1e-12)
        for tier in ("compute", "neuron", "memory"):
            assert entry["snn_over_ann"][tier] == pytest.approx(
                entry["snn"]["per_sequence"][tier] / entry["ann"]["per_sequence"][tier])


def test_ledger_matches_method_section_7_formulas():
    """§7: ANN 2·E_read·#read + E_write·#write + E_MAC·#MAC + E_AC·#AC; SNN E_neuron + (1+1/32)·E_read·Σ#read_t
    + (1/32)·E_write·Σ#write_t + E_MAC·#MAC + E_AC·#AC — for counts that follow the convention (each SNN read
    is a 32-bit operand plus the 1-bit spike driving it; every SNN write a spike; the ANN reads 2 words per op)."""
    target = load_target("cmos45nm")
    mac, ac, steps, operand_reads, spikes = 30.0, 700.0, 90.0, 700.0, 45.0
    ann_ops, ann_writes = 120.0, 40.0
    snn = Counts(mac=mac, ac=ac, neuron_steps=steps, reads=operand_reads, spike_reads=operand_reads,
                 spike_writes=spikes)
    ann = Counts(mac=ann_ops, reads=2 * ann_ops, writes=ann_writes)
    run = SimRun(tokens=3, snn={"x": snn}, ann={"x": ann}, layers={"x": 0}, sites={})
    total = ledger(run, target)["total"]
    e_mac, e_ac, e_read, e_write = target.mac.pj, target.ac.pj, target.read.pj, target.write.pj
    e_neuron = target.neuron.pj * steps
    snn_paper = e_neuron + (1 + 1 / 32) * e_read * operand_reads + e_write / 32 * spikes + e_mac * mac + e_ac * ac
    ann_paper = 2 * e_read * ann_ops + e_write * ann_writes + e_mac * ann_ops
    assert total["snn"]["per_sequence"]["memory"] == pytest.approx(snn_paper * 1e-12, rel=1e-12)
    assert total["ann"]["per_sequence"]["memory"] == pytest.approx(ann_paper * 1e-12, rel=1e-12)
    assert total["snn"]["per_sequence"]["compute"] == pytest.approx((e_mac * mac + e_ac * ac) * 1e-12, rel=1e-12)


def test_tiers_ordered_per_token_and_layers_sum_to_total():
    run = small_run(tokens=6)
    result = ledger(run, load_target("cmos45nm"))
    for entry in result["layers"] + [result["total"]]:
        for side in ("snn", "ann"):
            sequence, token = entry[side]["per_sequence"], entry[side]["per_token"]
            assert sequence["compute"] <= sequence["neuron"] <= sequence["memory"]
            assert token == pytest.approx({tier: value / 6 for tier, value in sequence.items()}, rel=1e-12)
        assert entry["ann"]["per_sequence"]["neuron"] == entry["ann"]["per_sequence"]["compute"]
    for side in ("snn", "ann"):
        for scope in ("per_sequence", "per_token"):
            for tier in ("compute", "neuron", "memory"):
                layer_sum = sum(entry[side][scope][tier] for entry in result["layers"])
                assert layer_sum == pytest.approx(result["total"][side][scope][tier], rel=1e-12)
        for count in Counts().to_dict():
            assert sum(entry["counts"][side][count] for entry in result["layers"]) == \
                result["total"]["counts"][side][count]


def test_convention_text_states_counting_formulas_and_constants():
    target = load_target("cmos45nm")
    text = ledger(small_run(), target, attention="full")["convention"]
    assert text.startswith(CONVENTION)
    assert "Attention counted as full" in text
    for line in ("E = E_MAC·#MAC + E_AC·#AC", "E = compute + E_neuron·#neuron_steps",
                 "E_read·(#reads + #spike_reads/32) + E_write·(#writes + #spike_writes/32)",
                 "E_neuron = E_read + E_write + E_AC", "E_MAC = 4.6 pJ (32-bit)"):
        assert line in text
    assert all(constant.source in text for constant in target.constants.values())


def test_bad_options_and_counts(tmp_path):
    run, target = small_run(), load_target("cmos45nm")
    with pytest.raises(SpikecompileError, match=r"^attention[^\n]*'fulll'[^\n]*causal, full$"):
        ledger(run, target, attention="fulll")
    wide = load_target(write_target(tmp_path, constants_table(**{"read.bits": 64})))
    with pytest.raises(SpikecompileError, match=rf"constants.read.bits is 64: the ledger counts {WORD_BITS}-bit"):
        ledger(run, wide)
    run.ann["embed"] = Counts(mac=1.0, neuron_steps=2.0)
    with pytest.raises(ValueError, match="ANN counts of node embed"):
        ledger(run, target)


# --- report ----------------------------------------------------------------------------------------------------

def test_report_files_parse_and_repeat_byte_for_byte(tmp_path):
    run, target = small_run(), load_target("cmos45nm")
    result = ledger(run, target)
    samples = 0.3 * torch.randn(4000, generator=torch.Generator().manual_seed(1))
    neuron = base2_params(1.0, T=4)
    paths = write_report(run, result, tmp_path / "a", site="layers.0.q", samples=samples, neuron=neuron)
    assert set(paths) == {"json", "markdown", "firing_rate", "energy", "histogram"}
    payload = json.loads(paths["json"].read_text())
    assert payload["ledger"] == json.loads(json.dumps(result)) and payload["tokens"] == 6
    markdown = paths["markdown"].read_text()
    for row in TIER_ROWS:
        assert sum(line.startswith(row) for line in markdown.splitlines()) == 1
    assert "## Counting convention" in markdown and CONVENTION in markdown
    for name in ("firing_rate", "energy", "histogram"):
        assert paths[name].read_bytes().startswith(PNG_MAGIC) and f"]({paths[name].name})" in markdown
    again = write_report(run, result, tmp_path / "b", site="layers.0.q", samples=samples, neuron=neuron)
    assert all(paths[name].read_bytes() == again[name].read_bytes() for name in paths)

    histogram = payload["histogram"]
    low, high = float(samples.min()), float(samples.max())
    assert histogram["range"] == [low, high] and sum(histogram["counts"]) == samples.numel()
    grid = torch.linspace(low, high, 100_001)
    assert histogram["levels"] == torch.unique(golden_base2(grid, 1.0, 4)).tolist()


def test_firing_rates_pool_spikes_over_slots():
    run = small_run()
    rates = firing_rates(run.sites)
    silu = [run.sites[f"layers.{layer}.silu"] for layer in (0, 1)]
    pooled = sum(sum(site["spikes_per_step"]) for site in silu) / sum(site["elements"] * 4 for site in silu)
    assert rates["by_kind"]["silu"] == pytest.approx(pooled)
    assert rates["by_layer"]["q"]["1"] == pytest.approx((4.0 + 2.0 + 1.0 + 0.0) / (20 * 4))  # layer 1: 20 elements
    assert rates["layers"] == ["0", "1", "other"] and rates["by_layer"]["norm"] == {"other": 0.05}
    spikes = sum(sum(site["spikes_per_step"]) for site in run.sites.values())
    assert rates["overall"] == pytest.approx(spikes / sum(site["elements"] * 4 for site in run.sites.values()))


def test_overlay_levels_are_exactly_the_fitted_neurons_outputs_in_range():
    """A neuron with bases away from 2 (not a uniform grid): the tree enumeration finds exactly the values
    phase_quantize gives on a grid dense enough to hit every output interval."""
    generator = torch.Generator().manual_seed(0)
    bases = {name: 1.7 + 0.6 * torch.rand(2, generator=generator) for name in ("d", "h", "theta")}
    neuron = PhaseNeuronParams(tau=torch.tensor(1.3), genotype=even_genotype(6, 2), **bases)
    for low, high in ((-1.125, 0.8125), (0.1875, 0.3125), (-0.3125, -0.1875)):  # float32-exact ends
        grid = torch.linspace(low, high, 400_001)
        assert torch.equal(reachable_levels(neuron, low, high), torch.unique(phase_quantize(grid, neuron)))


def test_unknown_site_is_an_error(tmp_path):
    run = small_run()
    with pytest.raises(SpikecompileError, match="site 'layers.9.q' unknown"):
        write_report(run, ledger(run, load_target("cmos45nm")), tmp_path, site="layers.9.q",
                     samples=torch.ones(3), neuron=base2_params(1.0, T=4))
