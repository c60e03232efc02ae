"""map_loihi2: place an IR graph on Loihi 2 neurocores and chips under the limits of targets/loihi2.toml, and
report cores, chips, synapse memory, spike traffic and what does not fit.

The mapping (per-token streaming: one token's activations on chip at a time, every weight stored once):
  units    a spike site (PhaseNeuron): n neurons, n its elements per token (inspect.per_token at a context
           of L tokens: a softmax-probability site holds heads·(L + prefix) neurons per token);
           a synapse layer (a Linear fed by a site): in·out weights of weight_bits (dense, no index
           overhead: a lower bound on synapse memory) and `out` accumulating compartments.
  cores    a synapse layer is cut into input slices of at most axons_in_per_core inputs (more than one slice:
           a fan-in split, whose partial sums need a combining stage: reported as not fitting) and row
           blocks of at most r = min(neurons_per_core, ⌊synapse_memory_per_core / (slice·weight_bits)⌋) rows;
           one block per core. A site reaches every row block of its consumers' slices (its fan-out f cores),
           so a core holds at most min(neurons_per_core, ⌊axons_out_per_core / f⌋) of its neurons; site
           pieces share cores next-fit in topological order. Cores fill chips in that order (cores_per_chip).
  traffic  a site sends n·T·rate spikes per token; each is one message to every core it reaches (all inter-
           core: sites and synapse blocks never share a core) and one accumulate per row it reaches (synaptic
           ops); a networkx graph of chips weighs each chip-to-chip link by its messages (inter-chip traffic,
           the busiest link); spikes into non-spiking ops (q, k, v, probabilities, SiLU) leave the neurocores.
  rates    spikes per neuron per step, by site name or site kind: given, or measured by running each site's
           neuron on its calibration samples (firing_rates), else `default_rate` (reported as assumed).
  fit      cores against cores_per_chip × chips of each system; fan-in splits; a neuron whose fan-out exceeds
           axons_out_per_core; fixed point: a synapse sum 2·Σ_j|m_ij| above the accumulator (from the weights
           when the store holds them, else the worst case 2·in·2^(weight_bits−1)), a site whose 24-bit
           potential grid has fewer fractional bits than its thresholds need (grid_bits: T + 1 for the phase
           coding's v0 = ½·τ·2^-T).
  state    neuron_state: the per-neuron state beyond the potential — the spike-budget counters (sites, bits,
           bits per token) and the sites whose thresholds θ(t) − v0 go negative — with the source of each.

The fixed-point formats (shared with the Lava backend's fixed_pt models):
  weights     one shared exponent e per matrix and a signed b-bit mantissa m (b = weight_bits):
              e = ⌈log2(max|W| / (2^(b−1) − 1))⌉,  m = clip(rint(W / 2^e), −2^(b−1), 2^(b−1) − 1),
              |W − m·2^e| ≤ 2^(e−1). Lava's 8-bit mixed-sign synapse holds 2m (even values in [−256, 254]), so a
              synapse sum Σ_j 2m_ij·σ_j s_j is an exact integer bounded by 2·Σ_j |m_ij|.
  potentials  a site's integers count units of τ·2^-F, F the largest integer with 2^g·V·2^F/τ ≤ 2^(s−1) − 1,
              s = state_bits, g = guard_bits, and V (potential_level) the largest of
                Σ_t h(t) + max_t θ'(t)   the level above which every step fires (θ' = θ − v0, the threshold
                                         against the residual r = v − v0; v0 < 0 raises it),
                max_t |θ'(t)|            the thresholds, signed: θ'(t) < 0 where v0 > θ(t) (a large v0),
                max_t (h(t) − θ'(t))     how far below 0 a residual falls (r_t > θ'(t) before a reset of h(t)),
              the first in the phase coding (v0 = ½·τ·2^-T: small, positive). Saturating at V changes no spike
              (every step fires there, up to a budget); the guard bits leave room for partial sums that
              overshoot. Source: the 24-bit u, v of lava-nc's fixed_pt neurons (targets/loihi2.toml
              [limits.state_bits]) holding conversion.neuron's potential. With all bases 2, θ(t) and h(t) are
              integers of the grid whenever F ≥ T, and θ'(t) when v0 is one too (grid_bits: T + 1 for the
              default v0).
  budget      a site with a spike budget 1 ≤ K < T keeps a per-neuron count of its spikes so far, 0..K, in an
              unsigned counter of ⌈log2(K + 1)⌉ bits (budget_counter_bits; K = 0 has none and K ≥ T never binds:
              a neuron fires at most T times). Source: conversion.neuron.magnitude_spikes, s_t = [r_t > θ'(t)] ∧
              [Σ_{u<t} s_u < K] (issue #7's codings: ttfs K = 1, spikedattn K = 2, sdllm K = 2^(b−1) − 1); the
              Lava backend keeps it in its PhaseNeuron's `count`.
"""

from __future__ import annotations

import math
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import networkx as nx
import numpy as np

from ..errors import SpikecompileError
from ..ir import Graph, Linear, PhaseNeuron, validate
from .manager import Pass, PassContext, PassResult, register_pass

LIMITS = ("cores_per_chip", "neurons_per_core", "synapse_memory_per_core", "axons_in_per_core", "axons_out_per_core",
          "synapses_per_chip", "weight_bits", "state_bits", "accumulator_bits", "payload_bits")
SPIKE_PAYLOAD_BITS = 2  # a spike carries σ ∈ {−1, +1} (backends/lava: d(t) is a receiver-side gain)


@dataclass(frozen=True)
class Loihi2:
    """A loaded targets/loihi2.toml: limits and systems (chips) by name, with their sources."""

    file: str
    limits: dict[str, int]
    guard_bits: int
    systems: dict[str, int]
    sources: dict[str, str]


def load_loihi2(path: str | Path | None = None) -> Loihi2:
    """targets/loihi2.toml (packaged) or the file at `path`; SpikecompileError naming the file and field."""
    if path is None:
        label, text = "targets/loihi2.toml", resources.files("spikecompile.targets").joinpath("loihi2.toml").read_text()
    else:
        label = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise SpikecompileError(f"{label}: cannot read the Loihi 2 target ({error.strerror})") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpikecompileError(f"{label}: not valid TOML ({error})") from None
    tables = {**{f"limits.{name}": entry for name, entry in document.get("limits", {}).items()},
              **{f"fixed_point.{name}": entry for name, entry in document.get("fixed_point", {}).items()}}
    for name in (*(f"limits.{limit}" for limit in LIMITS), "fixed_point.guard_bits"):
        entry = tables.get(name)
        if not isinstance(entry, dict) or not _is_count(entry.get("value"), 0) or not entry.get("unit") \
                or not entry.get("source"):
            raise SpikecompileError(f"{label}: [{name}] must give an integer value ≥ 0, a unit and a source")
    systems = document.get("systems", {})
    if not systems or not all(isinstance(entry, dict) and _is_count(entry.get("chips"), 1) and entry.get("source")
                              for entry in systems.values()):
        raise SpikecompileError(f"{label}: [systems.<name>] tables must give chips (an integer ≥ 1) and a source")
    return Loihi2(label, {name: tables[f"limits.{name}"]["value"] for name in LIMITS},
                  tables["fixed_point.guard_bits"]["value"], {name: entry["chips"] for name, entry in systems.items()},
                  {name: entry["source"] for name, entry in {**tables, **systems}.items()})


def _is_count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


# ---- fixed-point formats --------------------------------------------------------------------------------------------

def weight_exponent(max_abs: float, bits: int) -> int:
    """e = ⌈log2(max|W| / (2^(b−1) − 1))⌉ (0 for an all-zero matrix)."""
    return math.ceil(math.log2(max_abs / (2 ** (bits - 1) - 1))) if max_abs > 0 else 0


def quantize_weights(weights: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """(m, e) with W ≈ m·2^e: m int8 (int32 above 8 bits), e the shared exponent."""
    exponent = weight_exponent(float(np.abs(weights).max(initial=0.0)), bits)
    limit = 2 ** (bits - 1)
    mantissa = np.clip(np.rint(np.asarray(weights, dtype=np.float64) * 2.0 ** -exponent), -limit, limit - 1)
    return mantissa.astype(np.int8 if bits <= 8 else np.int32), exponent


def accumulator_peak(mantissa: np.ndarray) -> int:
    """The largest |Σ_j 2m_ij·σ_j s_j| any ternary spike vector can give: max_i 2·Σ_j |m_ij|."""
    return int(2 * np.abs(mantissa.astype(np.int64)).sum(axis=-1).max(initial=0))


def residual_schedule(node: PhaseNeuron) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(d(t), h(t), θ(t), θ'(t) = θ(t) − v0) as float32 arrays, in conversion.neuron.magnitude_spikes' arithmetic."""
    from ..neuron import step_schedule

    d, reset, theta = (values.numpy() for values in step_schedule(node.params()))
    return d, reset, theta, theta - node.v0.numpy()


def potential_level(node: PhaseNeuron) -> float:
    """V of the site's potential grid (module docstring): the largest magnitude its state holds, before the guard
    bits — the all-fire level, the largest |θ'(t)| and the deepest residual, whatever the sign and size of v0."""
    _, reset, _, threshold = (values.astype(np.float64) for values in residual_schedule(node))
    all_fire = float(np.sum(reset) + np.max(threshold))
    return max(all_fire, float(np.max(np.abs(threshold))), float(np.max(reset - threshold)))


def potential_exponent(node: PhaseNeuron, state_bits: int, guard_bits: int) -> int:
    """F of the site's potential grid (module docstring)."""
    level = potential_level(node)
    return math.floor(math.log2((2 ** (state_bits - 1) - 1) * float(node.tau) / (2 ** guard_bits * level)))


def grid_bits(node: PhaseNeuron) -> int:
    """The fractional bits F needs for θ'(t) = θ(t) − v0 to be integers of the grid when the bases are 2: T for
    θ(t) = τ·2^-(t+1), f for v0 = k·τ·2^-f (k odd; T + 1 for the phase coding's ½·τ·2^-T, and for a v0 that is no
    such multiple of τ, as the default's half LSB)."""
    ratio = Fraction(float(node.v0)) / Fraction(float(node.tau))
    power_of_two = ratio.denominator & (ratio.denominator - 1) == 0
    return max(node.timesteps, ratio.denominator.bit_length() - 1 if power_of_two else node.timesteps + 1)


def budget_counter_bits(node: PhaseNeuron) -> int:
    """Bits of the site's per-neuron spike counter (module docstring): ⌈log2(K + 1)⌉ for a budget 1 ≤ K < T, else 0."""
    budget = node.max_spikes
    return math.ceil(math.log2(budget + 1)) if 0 < budget < node.timesteps else 0


def flip_level(node: PhaseNeuron) -> float:
    """The largest jump of the site's output x̂(x) = σ·Σ_t d(t)·s_t at a discontinuity: between the outputs of
    adjacent magnitude intervals (the spike patterns of magnitudes m, enumerated as a decision tree whose cuts
    θ'(t) + Σ_{u<t} h(u)·s_u may have either sign, a branch that has spent its budget K staying quiet), and across
    x = 0, 2·x̂(0+) (nonzero only where some θ'(t) < 0: a large v0). What an input moved across one threshold
    changes (the Lava backend's flip allowance); cuts in float64."""
    d, reset, _, threshold = (values.astype(np.float64) for values in residual_schedule(node))
    budget = node.max_spikes
    low, high = np.zeros(1), np.array([2.0 * potential_level(node)])  # above V the pattern no longer changes
    resets, spent, values = np.zeros(1), np.zeros(1, dtype=np.int64), np.zeros(1)
    for t in range(node.timesteps):
        cut = threshold[t] + resets
        if budget:
            cut = np.where(spent < budget, cut, np.inf)
        quiet_high, firing_low = np.minimum(high, cut), np.maximum(low, cut)
        quiet, firing = quiet_high > low, high > firing_low
        low, high = np.concatenate([low[quiet], firing_low[firing]]), np.concatenate([quiet_high[quiet], high[firing]])
        resets = np.concatenate([resets[quiet], resets[firing] + reset[t]])
        spent = np.concatenate([spent[quiet], spent[firing] + 1])
        values = np.concatenate([values[quiet], values[firing] + d[t]])
    values = values[np.argsort(low, kind="stable")]
    return float(max(np.max(np.abs(np.diff(values)), initial=0.0), 2.0 * values[0]))


# ---- firing rates -------------------------------------------------------------------------------------------------

def firing_rates(graph: Graph, samples: Mapping) -> dict[str, float]:
    """{site: spikes per neuron per step} from each site's neuron on its calibration samples (sites without
    samples are left out)."""
    from ..neuron import phase_encode

    rates = {}
    for name in graph:
        node = graph[name]
        if isinstance(node, PhaseNeuron) and node.site in samples:
            _, spikes = phase_encode(samples[node.site].float(), node.params())
            rates[node.site] = float(spikes.float().mean())
    return rates


def rates_by_kind(rates: Mapping[str, float]) -> dict[str, float]:
    """The mean rate of each site kind (the last part of the site name)."""
    kinds: dict[str, list[float]] = {}
    for site, rate in rates.items():
        kinds.setdefault(site.rsplit(".", 1)[-1], []).append(rate)
    return {kind: sum(values) / len(values) for kind, values in sorted(kinds.items())}


# ---- mapping ------------------------------------------------------------------------------------------------------

def map_loihi2(graph: Graph, store: Mapping | None = None, rates: Mapping[str, float] | None = None,
               samples: Mapping | None = None, target: Loihi2 | None = None, context: int = 512,
               default_rate: float = 0.25) -> dict:
    """Place `graph` (timesteps assigned) on Loihi 2 and return the report (module docstring).

    store: the weights, for the fixed-point accumulator check (None: the worst case); rates: {site or site
    kind: rate}, winning over rates measured on `samples` ({site: calibration samples}); context: the number
    of tokens L an attention query sees.
    """
    start = time.perf_counter()
    target = target or load_loihi2()
    measured = firing_rates(graph, samples) if samples else {}
    units = _units(graph, store, context, target)
    site_rates = {name: _rate(unit["site"], rates or {}, measured, default_rate)
                  for name, unit in units.nodes(data=True) if unit["kind"] == "site"}
    cores, where = _place(units, target)
    graph = _chip_graph(units, where, site_rates, target.limits["cores_per_chip"])
    report = _report(units, cores, graph, site_rates, target, context)
    report["rates"] = {"source": "given" if rates else "measured on calibration samples" if measured else
                       f"assumed {default_rate} everywhere", "by_kind": rates_by_kind(
                           {units.nodes[name]["site"]: rate for name, rate in site_rates.items()})}
    report["seconds"] = time.perf_counter() - start
    return report


def _rate(site: str, rates: Mapping[str, float], measured: Mapping[str, float], default: float) -> float:
    for key in (site, site.rsplit(".", 1)[-1]):
        if key in rates:
            return float(rates[key])
    return measured.get(site, default)


def _units(graph: Graph, store: Mapping | None, context: int, target: Loihi2) -> nx.DiGraph:
    """The mappable units (sites, synapse layers) and the spike edges site → synapse layer, in graph order."""
    from ..ir.shapes import per_token

    types = validate(graph)
    units = nx.DiGraph()
    limits = target.limits
    for name in graph.topological_order():
        node = graph[name]
        if isinstance(node, PhaseNeuron):
            neurons = per_token(types[name].shape, {"batch": 1, "seq": context})
            if neurons is None:
                raise SpikecompileError(f"node {name}: shape {types[name]} has no sequence dim to map per token")
            consumers = graph.consumers(name)
            units.add_node(name, kind="site", site=node.site, neurons=neurons, timesteps=node.timesteps,
                           to_ops=any(not isinstance(graph[c], Linear) for c in consumers),
                           potential=potential_exponent(node, limits["state_bits"], target.guard_bits),
                           grid_bits=grid_bits(node), v0=float(node.v0 / node.tau),
                           negative_thresholds=bool((residual_schedule(node)[3] < 0).any()),
                           counter_bits=budget_counter_bits(node))
        elif isinstance(node, Linear) and isinstance(graph[graph.inputs(name)["x"]], PhaseNeuron):
            slices = math.ceil(node.in_features / limits["axons_in_per_core"])
            width = math.ceil(node.in_features / slices)
            rows = min(limits["neurons_per_core"],
                       limits["synapse_memory_per_core"] // (width * limits["weight_bits"]))
            units.add_node(name, kind="synapse", inputs=node.in_features, outputs=node.out_features,
                           slices=slices, slice_width=width, rows=rows,
                           row_blocks=math.ceil(node.out_features / rows),
                           accumulator=_accumulator_peak(node, store, limits["weight_bits"]))
            units.add_edge(graph.inputs(name)["x"], name)
    for name in units:  # each neuron reaches every row block of its input slice in each consumer
        units.nodes[name]["fan_out"] = sum(units.nodes[consumer]["row_blocks"] for consumer in units.successors(name))
    return units


def _accumulator_peak(node: Linear, store: Mapping | None, bits: int) -> tuple[int, bool]:
    """(the largest synapse sum, measured from the weights or not)."""
    if store is None or node.weight.name not in store:
        return 2 * node.in_features * 2 ** (bits - 1), False
    weights = store[node.weight.name].detach().float().numpy()
    return accumulator_peak(quantize_weights(weights, bits)[0]), True


def _place(units: nx.DiGraph, target: Loihi2) -> tuple[list[dict[str, int]], dict[str, list]]:
    """(cores: the units on each core {unit: neurons or rows}; where: a site's pieces [(core, first, end)] of
    its neurons, a synapse layer's cores [slice][row block]), packed as the module docstring says."""
    limits = target.limits
    cores: list[dict[str, int]] = []
    where: dict[str, list] = {}
    free_neurons = free_axons = 0
    for name, unit in units.nodes(data=True):
        if unit["kind"] == "synapse":
            where[name] = [[len(cores) + block + piece * unit["row_blocks"] for block in range(unit["row_blocks"])]
                           for piece in range(unit["slices"])]
            cores += [{name: min(unit["rows"], unit["outputs"] - block * unit["rows"])}
                      for _ in range(unit["slices"]) for block in range(unit["row_blocks"])]
            free_neurons = 0  # the next site starts a core of its own
            continue
        fan_out, placed = unit["fan_out"], 0
        where[name] = []
        while placed < unit["neurons"]:
            if free_neurons == 0 or free_axons < fan_out:
                cores.append({})
                free_neurons, free_axons = limits["neurons_per_core"], limits["axons_out_per_core"]
            # at least one neuron per core, even one whose fan-out exceeds the output axons (reported)
            take = max(1, min(unit["neurons"] - placed, free_neurons, free_axons // fan_out if fan_out else free_neurons))
            cores[-1][name] = cores[-1].get(name, 0) + take
            where[name].append((len(cores) - 1, placed, placed + take))
            placed += take
            free_neurons -= take
            free_axons -= take * fan_out
    return cores, where


def _chip_graph(units: nx.DiGraph, where: dict[str, list], rates: dict[str, float], cores_per_chip: int) -> nx.DiGraph:
    """Chips and the spike messages per token between their cores (edge weight; a self-loop for messages that
    stay on one chip): a site's piece of neurons [first, end) sends neurons·T·rate spikes per token, each to
    every row block of the input slice those neurons belong to."""
    graph = nx.DiGraph()
    for name, unit in units.nodes(data=True):
        if unit["kind"] != "site":
            continue
        per_neuron = unit["timesteps"] * rates[name]
        for consumer in units.successors(name):
            width = units.nodes[consumer]["slice_width"]
            blocks_per_chip = [Counter(core // cores_per_chip for core in blocks) for blocks in where[consumer]]
            for core, first, end in where[name]:
                for piece, chips in enumerate(blocks_per_chip):
                    overlap = max(0, min(end, (piece + 1) * width) - max(first, piece * width))
                    for chip, blocks in chips.items() if overlap else ():
                        source = core // cores_per_chip
                        weight = graph.get_edge_data(source, chip, {"weight": 0.0})["weight"]
                        graph.add_edge(source, chip, weight=weight + overlap * per_neuron * blocks)
    return graph


def _report(units: nx.DiGraph, cores: list[dict[str, int]], graph: nx.DiGraph, rates: dict[str, float],
            target: Loihi2, context: int) -> dict:
    limits = target.limits
    sites = [(name, unit) for name, unit in units.nodes(data=True) if unit["kind"] == "site"]
    synapse_units = [unit for _, unit in units.nodes(data=True) if unit["kind"] == "synapse"]
    spikes = {name: unit["neurons"] * unit["timesteps"] * rates[name] for name, unit in sites}
    synapses = sum(unit["inputs"] * unit["outputs"] for unit in synapse_units)
    synapse_cores = sum(any(units.nodes[name]["kind"] == "synapse" for name in core) for core in cores)
    chips = math.ceil(len(cores) / limits["cores_per_chip"])
    return {
        "target": target.file, "context": context,
        "units": {"sites": len(sites), "synapse_layers": len(synapse_units)},
        "neurons_per_token": sum(unit["neurons"] for _, unit in sites),
        "compartments": sum(unit["outputs"] for unit in synapse_units),
        "synapses": synapses, "synapse_memory_bits": synapses * limits["weight_bits"],
        "cores": {"total": len(cores), "synapse": synapse_cores, "site": len(cores) - synapse_cores},
        "chips": chips, "chips_by_synapse_count": math.ceil(synapses / limits["synapses_per_chip"]),
        "systems": {name: {"chips": count, "fits": chips <= count} for name, count in target.systems.items()},
        "traffic_per_token": {
            "spikes": sum(spikes.values()),
            "to_ops": sum(spikes[name] for name, unit in sites if unit["to_ops"]),
            "inter_core": graph.size(weight="weight"),
            "inter_chip": sum(weight for source, chip, weight in graph.edges(data="weight") if source != chip),
            "busiest_chip_link": max((weight for source, chip, weight in graph.edges(data="weight") if source != chip),
                                     default=0.0),
            "synaptic_ops": sum(spikes[name] * units.nodes[consumer]["outputs"]
                                for name, _ in sites for consumer in units.successors(name))},
        "neuron_state": _neuron_state(sites, limits["state_bits"]),
        "does_not_fit": _misfits(units, chips, target),
    }


NEURON_STATE_SOURCES = {
    "potential_bits": "targets/loihi2.toml [limits.state_bits]: the 24-bit u, v of lava-nc's fixed_pt neurons; the "
                      "grid per site from potential_level (v0 of either sign and any size, module docstring)",
    "counter_bits": "conversion.neuron.magnitude_spikes' spike budget: s_t needs Σ_{u<t} s_u < K, a count 0..K of "
                    "⌈log2(K + 1)⌉ bits per neuron where 1 ≤ K < T (budget_counter_bits)",
}


def _neuron_state(sites: list[tuple[str, dict]], state_bits: int) -> dict:
    """The per-neuron state the sites need beyond the potential: the budget counters, and which sites hold
    negative thresholds (v0 above some θ(t): a zero input fires there)."""
    budgeted = [(name, unit) for name, unit in sites if unit["counter_bits"]]
    return {"potential_bits": state_bits,
            "budget_sites": len(budgeted),
            "counter_bits": max((unit["counter_bits"] for _, unit in budgeted), default=0),
            "counter_bits_per_token": sum(unit["neurons"] * unit["counter_bits"] for _, unit in budgeted),
            "negative_threshold_sites": sorted(name for name, unit in sites if unit["negative_thresholds"]),
            "sources": NEURON_STATE_SOURCES}


def _misfits(units: nx.DiGraph, chips: int, target: Loihi2) -> list[str]:
    """One line per thing that does not fit: it names the unit, the limit and its value."""
    limits = target.limits
    lines = []
    accumulator_limit = 2 ** (limits["accumulator_bits"] - 1) - 1
    for name, unit in units.nodes(data=True):
        if unit["kind"] == "synapse":
            if unit["slices"] > 1:
                lines.append(f"{name}: fan-in {unit['inputs']} > {limits['axons_in_per_core']} input axons per core; "
                             f"split into {unit['slices']} partial sums that need a combining stage")
            peak, measured = unit["accumulator"]
            if peak > accumulator_limit:
                lines.append(f"{name}: fixed-point overflow: a synapse sum reaches {peak} "
                             f"({'from the weights' if measured else 'worst case, no weights'}) > "
                             f"{accumulator_limit} ({limits['accumulator_bits']}-bit accumulator)")
            continue
        if unit["fan_out"] > limits["axons_out_per_core"]:
            lines.append(f"{name}: one neuron reaches {unit['fan_out']} cores > {limits['axons_out_per_core']} "
                         f"output axons per core")
        if unit["potential"] < unit["grid_bits"]:
            lines.append(f"{name}: fixed point: the {limits['state_bits']}-bit potential leaves {unit['potential']} "
                         f"fractional bits < {unit['grid_bits']} (T = {unit['timesteps']}, v0 = {unit['v0']:.4g}·τ); "
                         f"thresholds are rounded")
    if SPIKE_PAYLOAD_BITS > limits["payload_bits"]:
        lines.append(f"spikes: a {SPIKE_PAYLOAD_BITS}-bit payload > {limits['payload_bits']} payload bits")
    lines += [f"system {name}: needs {chips} chips > {count}" for name, count in target.systems.items() if chips > count]
    return lines


# ---- analytic mode and the pass -----------------------------------------------------------------------------------

MODEL_CONFIGS = ("llama-2-7b", "llama-3-8b", "smollm2-135m")


def model_config(name_or_path: str | Path) -> dict:
    """A Hugging Face config.json-style dict: a packaged one (targets/models/<name>.json) or a file."""
    import json

    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in MODEL_CONFIGS:
        return json.loads(resources.files("spikecompile.targets").joinpath(f"models/{name_or_path}.json").read_text())
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SpikecompileError(f"{path}: cannot read a model config ({error}); packaged: "
                                f"{', '.join(MODEL_CONFIGS)}") from None


def map_config(config: Mapping, timesteps: int = 8, **options) -> dict:
    """Analytic mode: map the IR traced from a config alone (weights on the meta device, base-2 neurons at
    `timesteps`; frontend.config_graph); options as for map_loihi2 (no store, no samples)."""
    from ..frontend.config import config_graph

    start = time.perf_counter()
    graph = config_graph(dict(config), timesteps)
    traced = time.perf_counter() - start
    report = map_loihi2(graph, **options)
    report["seconds_trace"] = traced
    return report


@register_pass
class MapLoihi2(Pass):
    name = "map_loihi2"
    description = "place the graph on Loihi 2 cores and chips; report resources, spike traffic and what does not fit"
    after = ("assign_timesteps", "fold_hadamard")
    options: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "target": lambda value: load_loihi2(value), "context": lambda value: _check_count(value, "context"),
        "rates": lambda value: {str(key): float(rate) for key, rate in dict(value).items()}}

    def requires(self, graph: Graph) -> None:
        missing = [name for name in graph if graph[name].timesteps is None]
        if missing:
            raise SpikecompileError(f"node {missing[0]}: no timesteps; run assign_timesteps first")

    def run(self, graph: Graph, context: PassContext) -> PassResult:
        shared = context.shared
        report = map_loihi2(graph, store=getattr(shared, "store", None), samples=getattr(shared, "samples", None),
                            **context.options)
        return PassResult(graph, False, report)


def _check_count(value, what: str) -> int:
    if not _is_count(value, 1):
        raise SpikecompileError(f"{what} must be an integer ≥ 1, got {value!r}")
    return value
