"""The energy ledger: a run's counts priced with a target's constants (docs/method.md §7), three tiers side by side.

For counts c (backends/sim/results.py) and constants E in pJ (spikecompile.hardware.energy), the same three formulas
price the SNN and its ANN counterpart (the ANN has no neuron steps and no spikes, so its middle tier equals its
first):

    compute  = E_MAC·c.mac + E_AC·c.ac
    neuron   = compute + E_neuron·c.neuron_steps
    memory   = neuron + E_read·(c.reads + c.spike_reads/32) + E_write·(c.writes + c.spike_writes/32)

A spike is 1 bit, 1/32 of a 32-bit word. An AC reads its 32-bit operand and the spike that drives it, so the
SNN's read term is §7's (1+1/32)·E_read·Σ_t #read_t; the ANN's two reads per MAC are already two counted
reads, §7's 2·E_read·#read.

Two options of the target change a term (hardware.energy):
* mac_int8 and read_int8 add an int8-ANN column: the ANN's counts with its c.int8_mac matmul MACs at E_MAC8
  instead of E_MAC and their 2·c.int8_mac operand reads at E_read8 instead of E_read.
* synop prices the SNN's spike-driven accumulates (one per spike read, c.spike_reads) at E_synop instead of E_AC.
"""

from __future__ import annotations

from spikecompile.errors import SpikecompileError
from spikecompile.hardware.energy import Constant, Target

from .counting import check_attention
from .results import CONVENTION, Counts, SimRun

TIERS = {
    "compute": "compute only",
    "neuron": "+ neuron state",
    "memory": "+ memory traffic",
}
WORD_BITS = 32
"""Counts are of 32-bit operations and words; a spike is 1 bit, 1/WORD_BITS of a word."""
JOULES_PER_PJ = 1e-12
SYMBOLS = {"mac": "E_MAC", "ac": "E_AC", "read": "E_read", "write": "E_write", "neuron": "E_neuron",
           "synop": "E_synop", "mac_int8": "E_MAC8", "read_int8": "E_read8"}
WIDTHS = {"mac": WORD_BITS, "ac": WORD_BITS, "read": WORD_BITS, "write": WORD_BITS, "mac_int8": 8, "read_int8": 8}
"""The width each priced count has (neuron and synop are priced per event, at any width)."""
SIDES = ("snn", "ann", "ann_int8")
"""The columns: the SNN, the fp32 ANN and, where the target prices it, the int8 ANN (the same ANN counts)."""


def tier_energies(counts: Counts, target: Target, int8: bool = False) -> dict[str, float]:
    """The three tiers in pJ (module docstring): compute, + neuron state, + memory traffic; each includes the last.
    int8: price counts.int8_mac as the int8 ANN does (the target must give mac_int8 and read_int8)."""
    int8_macs = counts.int8_mac if int8 else 0.0
    synops = counts.spike_reads if target.synop is not None else 0.0
    compute = target.mac.pj * (counts.mac - int8_macs) + target.ac.pj * (counts.ac - synops)
    if int8_macs:
        compute += target.mac_int8.pj * int8_macs
    if synops:
        compute += target.synop.pj * synops
    neuron = compute + target.neuron.pj * counts.neuron_steps
    memory = (neuron + target.read.pj * (counts.reads - 2 * int8_macs + counts.spike_reads / WORD_BITS)
              + target.write.pj * (counts.writes + counts.spike_writes / WORD_BITS))
    if int8_macs:
        memory += target.read_int8.pj * 2 * int8_macs
    return {"compute": compute, "neuron": neuron, "memory": memory}


def ledger(run: SimRun, target: Target, attention: str = "causal") -> dict:
    """Price `run` with `target`: SNN and ANN per tier, per sequence and per token (= per sequence / L), their
    ratio, per decoder layer and in total, with the count totals and the convention text. Energies in joules.

    `attention` names the convention the simulator counted attention under (causal or full): the counts arrive
    already taken, so the ledger checks the option and states it, and the caller passes the simulator's choice."""
    check_attention(attention)
    check_word_bits(target)
    check_ann_counts(run.ann)
    groups = layer_groups(run.layers, run.snn)
    layers = [{"layer": layer, **priced(run, nodes, target)} for layer, nodes in groups.items()]
    return {
        "unit": "J",
        "tokens": run.tokens,
        "attention": attention,
        "tiers": dict(TIERS),
        "target": target.to_dict(),
        "convention": convention_text(target, attention, run.tokens),
        "total": priced(run, list(run.snn), target),
        "layers": layers,
    }


def check_word_bits(target: Target) -> None:
    """The counts are of 32-bit MACs, adds and words (and the int8 ANN's 8-bit MACs and reads): a constant for
    another width would misprice them."""
    for name, constant in target.constants.items():
        width = WIDTHS.get(name)
        if width is not None and constant.bits != width:
            raise SpikecompileError(
                f"{target.file}: constants.{name}.bits is {constant.bits}: the ledger counts {width}-bit "
                f"operations and words (backends/sim/results.py); give the energy of one {width}-bit one")


def check_ann_counts(ann: dict[str, Counts]) -> None:
    """The ANN counterpart has no neurons and no spikes, and its int8 MACs are some of its MACs; anything else is
    a counting bug, not a cost."""
    for node, counts in ann.items():
        if counts.neuron_steps or counts.spike_reads or counts.spike_writes or counts.int8_mac > counts.mac:
            raise ValueError(f"ANN counts of node {node} hold neuron steps, spike traffic or more int8 MACs than "
                             f"MACs: {counts.to_dict()}")


def layer_groups(layers: dict[str, int | None], nodes) -> dict[int | None, list[str]]:
    """Nodes by decoder layer, layers in order, the nodes outside any layer (None) last."""
    groups: dict[int | None, list[str]] = {}
    for node in nodes:
        groups.setdefault(layers[node], []).append(node)
    return {layer: groups[layer] for layer in sorted(groups, key=lambda layer: (layer is None, layer or 0))}


def priced(run: SimRun, nodes: list[str], target: Target) -> dict:
    """{snn|ann[|ann_int8]: {per_sequence|per_token: {tier: J}}, snn_over_ann[, snn_over_ann_int8]: {tier: ratio or
    None}, counts: {snn|ann: …}}; the int8 ANN (the ANN's counts priced at 8 bit) where the target prices it."""
    counts = {side: sum((getattr(run, side)[node] for node in nodes), Counts()) for side in ("snn", "ann")}
    energy = {side: tier_energies(side_counts, target) for side, side_counts in counts.items()}
    if target.has_int8:
        energy["ann_int8"] = tier_energies(counts["ann"], target, int8=True)
    entry = {side: {"per_sequence": {tier: pj * JOULES_PER_PJ for tier, pj in tiers.items()},
                    "per_token": {tier: pj * JOULES_PER_PJ / run.tokens for tier, pj in tiers.items()}}
             for side, tiers in energy.items()}
    for side in [side for side in energy if side != "snn"]:
        entry[f"snn_over_{side}"] = {tier: energy["snn"][tier] / energy[side][tier] if energy[side][tier] else None
                                     for tier in TIERS}
    entry["counts"] = {side: side_counts.to_dict() for side, side_counts in counts.items()}
    return entry


def convention_text(target: Target, attention: str, tokens: int) -> str:
    """The counting convention (results.CONVENTION), the energy formulas, and every constant with unit, bits, source."""
    neuron_rule = ("E_neuron = E_read + E_write + E_AC per neuron step\n  (read v, compare with θ(t) and "
                   "subtract h(t) as one 32-bit add, write v)" if target.neuron_override is None
                   else "E_neuron per neuron step from the target file")
    constants = "\n".join(f"* {SYMBOLS[name]} = {constant_text(constant)}" for name, constant in target.constants.items())
    options = "".join(line for given, line in (
        (target.has_int8, "* int8 ANN column: the ANN's counts with its #int8_MAC matmul MACs at E_MAC8 (not E_MAC) "
                          "and their\n  2·#int8_MAC operand reads at E_read8 (not E_read); every other term as the "
                          "fp32 ANN's\n"),
        (target.synop is not None, "* SNN: each spike-driven accumulate (one per #spike_reads) at E_synop, the rest "
                                   "of #AC at E_AC\n")) if given)
    return f"""{CONVENTION}
Energy (docs/method.md §7) per sequence of L = {tokens} tokens, batch 1; per token = per sequence / L. The same
formulas price the SNN and its ANN counterpart (the ANN has no neuron steps and no spikes):
* {TIERS["compute"]}: E = E_MAC·#MAC + E_AC·#AC
* {TIERS["neuron"]}: E = compute + E_neuron·#neuron_steps; {neuron_rule}
* {TIERS["memory"]}: E = (+ neuron state) + E_read·(#reads + #spike_reads/32) + E_write·(#writes + #spike_writes/32)
  A spike is 1 bit, 1/32 of a 32-bit word. Each AC reads its 32-bit operand and the spike that drives it, which is
  §7's (1+1/32)·E_read per SNN read; the ANN's two reads per MAC are two counted reads, §7's 2·E_read·#read. The
  potential's reads and writes are in the neuron tier and not counted again as memory traffic.
{options}* Attention counted as {attention} (the Attention rule above).
Constants (target {target.name}, {target.file}):
{constants}
"""


def constant_text(constant: Constant) -> str:
    """'4.6 pJ (32-bit): what; source: …', with the pJ value added when the file used another unit."""
    in_pj = "" if constant.unit == "pJ" else f" = {constant.pj:g} pJ"
    status = f" [{constant.status}]" if constant.status else ""
    return (f"{constant.value:g} {constant.unit}{in_pj} ({constant.bits}-bit){status}: "
            f"{constant.what or constant.name}; source: {constant.source}")
