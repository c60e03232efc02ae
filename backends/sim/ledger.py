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
SYMBOLS = {"mac": "E_MAC", "ac": "E_AC", "read": "E_read", "write": "E_write", "neuron": "E_neuron"}


def tier_energies(counts: Counts, target: Target) -> dict[str, float]:
    """The three tiers in pJ (module docstring): compute, + neuron state, + memory traffic; each includes the last."""
    compute = target.mac.pj * counts.mac + target.ac.pj * counts.ac
    neuron = compute + target.neuron.pj * counts.neuron_steps
    memory = (neuron + target.read.pj * (counts.reads + counts.spike_reads / WORD_BITS)
              + target.write.pj * (counts.writes + counts.spike_writes / WORD_BITS))
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
    """The counts are of 32-bit MACs, adds and words: a constant for another width would misprice them."""
    for constant in (target.mac, target.ac, target.read, target.write):
        if constant.bits != WORD_BITS:
            raise SpikecompileError(
                f"{target.file}: constants.{constant.name}.bits is {constant.bits}: the ledger counts {WORD_BITS}-bit "
                f"operations and words (backends/sim/results.py); give the energy of one {WORD_BITS}-bit one")


def check_ann_counts(ann: dict[str, Counts]) -> None:
    """The ANN counterpart has no neurons and no spikes; a count there is a counting bug, not a cost."""
    for node, counts in ann.items():
        if counts.neuron_steps or counts.spike_reads or counts.spike_writes:
            raise ValueError(f"ANN counts of node {node} hold neuron steps or spike traffic: {counts.to_dict()}")


def layer_groups(layers: dict[str, int | None], nodes) -> dict[int | None, list[str]]:
    """Nodes by decoder layer, layers in order, the nodes outside any layer (None) last."""
    groups: dict[int | None, list[str]] = {}
    for node in nodes:
        groups.setdefault(layers[node], []).append(node)
    return {layer: groups[layer] for layer in sorted(groups, key=lambda layer: (layer is None, layer or 0))}


def priced(run: SimRun, nodes: list[str], target: Target) -> dict:
    """{snn|ann: {per_sequence|per_token: {tier: J}}, snn_over_ann: {tier: ratio or None}, counts: {snn|ann: …}}."""
    counts = {side: sum((getattr(run, side)[node] for node in nodes), Counts()) for side in ("snn", "ann")}
    energy = {side: tier_energies(side_counts, target) for side, side_counts in counts.items()}
    entry = {side: {"per_sequence": {tier: pj * JOULES_PER_PJ for tier, pj in tiers.items()},
                    "per_token": {tier: pj * JOULES_PER_PJ / run.tokens for tier, pj in tiers.items()}}
             for side, tiers in energy.items()}
    entry["snn_over_ann"] = {tier: energy["snn"][tier] / energy["ann"][tier] if energy["ann"][tier] else None
                             for tier in TIERS}
    entry["counts"] = {side: side_counts.to_dict() for side, side_counts in counts.items()}
    return entry


def convention_text(target: Target, attention: str, tokens: int) -> str:
    """The counting convention (results.CONVENTION), the energy formulas, and every constant with unit, bits, source."""
    neuron_rule = ("E_neuron = E_read + E_write + E_AC per neuron step\n  (read v, compare with θ(t) and "
                   "subtract h(t) as one 32-bit add, write v)" if target.neuron_override is None
                   else "E_neuron per neuron step from the target file")
    constants = "\n".join(f"* {SYMBOLS[name]} = {constant_text(constant)}" for name, constant in target.constants.items())
    return f"""{CONVENTION}
Energy (docs/method.md §7) per sequence of L = {tokens} tokens, batch 1; per token = per sequence / L. The same
formulas price the SNN and its ANN counterpart (the ANN has no neuron steps and no spikes):
* {TIERS["compute"]}: E = E_MAC·#MAC + E_AC·#AC
* {TIERS["neuron"]}: E = compute + E_neuron·#neuron_steps; {neuron_rule}
* {TIERS["memory"]}: E = (+ neuron state) + E_read·(#reads + #spike_reads/32) + E_write·(#writes + #spike_writes/32)
  A spike is 1 bit, 1/32 of a 32-bit word. Each AC reads its 32-bit operand and the spike that drives it, which is
  §7's (1+1/32)·E_read per SNN read; the ANN's two reads per MAC are two counted reads, §7's 2·E_read·#read. The
  potential's reads and writes are in the neuron tier and not counted again as memory traffic.
* Attention counted as {attention} (the Attention rule above).
Constants (target {target.name}, {target.file}):
{constants}
"""


def constant_text(constant: Constant) -> str:
    """'4.6 pJ (32-bit): what; source: …', with the pJ value added when the file used another unit."""
    in_pj = "" if constant.unit == "pJ" else f" = {constant.pj:g} pJ"
    return (f"{constant.value:g} {constant.unit}{in_pj} ({constant.bits}-bit): {constant.what or constant.name}; "
            f"source: {constant.source}")
