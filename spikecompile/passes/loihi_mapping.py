"""map_loihi2: place an IR graph on Loihi 2 neurocores and chips under the limits of targets/loihi2.toml, and
report cores, chips, synapse memory, spike traffic, neuron state and what does not fit.

Sites (PhaseNeuron) and synapse layers (a Linear fed by a site) are the units; synapse layers are cut into input
slices and row blocks of one core each, site neurons share cores next-fit under the output-axon limit, and cores
fill chips in topological order. The model, the fit checks and the fixed-point formats (hardware.loihi2) are
described in docs/loihi2.md.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import networkx as nx

from ..checks import is_count
from ..errors import SpikecompileError
from ..hardware.loihi2 import (
    OP_FORMAT, PAYLOAD_FRACTION_BITS, SPIKE_PAYLOAD_BITS, Loihi2, SiteFormat, SynapseFormat, accumulator_peak, budget_counter_bits,
    grid_bits, load_loihi2, potential_exponent, quantize_rows, residual_schedule, site_format, synapse_format,
)
from ..ir import Graph, Linear, PhaseNeuron, validate
from ..neuron import firing_rate
from .manager import Pass, PassContext, PassResult, register_pass


# ---- mapping ------------------------------------------------------------------------------------------------------

def map_loihi2(graph: Graph, store: Mapping | None = None, rates: Mapping[str, float] | None = None,
               samples: Mapping | None = None, target: Loihi2 | None = None, context: int = 512,
               default_rate: float = 0.25) -> dict:
    """Place `graph` (timesteps assigned) on Loihi 2 and return the report (docs/loihi2.md).

    store: the weights, for the fixed-point accumulator check (None: the worst case); rates: {site or site
    kind: rate}, winning over rates measured on `samples` ({site: calibration samples}); context: the number
    of tokens L an attention query sees.
    """
    start = time.perf_counter()
    target = target or load_loihi2()
    measured = _measured_rates(graph, samples) if samples else {}
    units = _units(graph, store, context, target)
    site_rates = {name: _rate(unit["site"], rates or {}, measured, default_rate)
                  for name, unit in units.nodes(data=True) if unit["kind"] == "site"}
    cores, where = _place(units, target)
    graph = _chip_graph(units, where, site_rates, target.limits["cores_per_chip"])
    report = _report(units, cores, graph, site_rates, target, context)
    report["rates"] = {"source": "given" if rates else "measured on calibration samples" if measured else
                       f"assumed {default_rate} everywhere", "by_kind": _mean_by_kind(
                           {units.nodes[name]["site"]: rate for name, rate in site_rates.items()})}
    report["seconds"] = time.perf_counter() - start
    return report


def _measured_rates(graph: Graph, samples: Mapping) -> dict[str, float]:
    """{site: spikes per neuron per step} of each site's neuron on its calibration samples (sites without samples
    are left out)."""
    sites = (graph[name] for name in graph if isinstance(graph[name], PhaseNeuron))
    return {node.site: firing_rate(samples[node.site], node.params()) for node in sites if node.site in samples}


def _mean_by_kind(rates: Mapping[str, float]) -> dict[str, float]:
    """The plain mean of the site rates of each site kind (the last part of the site name), kinds sorted: the
    rates the placement used, which are per site, not spike counts to pool (backends.sim.results.rates_by_kind)."""
    kinds: dict[str, list[float]] = {}
    for site, rate in rates.items():
        kinds.setdefault(site.rsplit(".", 1)[-1], []).append(rate)
    return {kind: sum(values) / len(values) for kind, values in sorted(kinds.items())}


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
            node.refuse_token_scales("the Loihi 2 mapping")
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
    return accumulator_peak(quantize_rows(weights, bits)[0]), True


# ---- the deployed formats of a graph ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Formats:
    """Every value's deployed format (hardware.loihi2): sites and synapse matrices by node name, each synapse's
    source site node, and the one format of the non-synaptic ops."""

    sites: dict[str, SiteFormat]
    synapses: dict[str, SynapseFormat]
    sources: dict[str, str]
    op: dict = field(default_factory=lambda: dict(OP_FORMAT))
    derived: dict = field(default_factory=dict, repr=False, compare=False)
    """Tensors computed from these formats once and reused by every run (passes.fixed_point)."""


def is_synapse(graph: Graph, name: str) -> bool:
    """A Linear fed by a spike site: a synapse matrix on the neurocores."""
    return isinstance(graph[name], Linear) and isinstance(graph[graph.inputs(name)["x"]], PhaseNeuron)


def deployed_formats(graph: Graph, store: Mapping, target: Loihi2 | None = None,
                     fraction_bits: Mapping[str, int] | None = None) -> Formats:
    """The formats `graph` (timesteps assigned) deploys in on `target` (default targets/loihi2.toml), each site's
    payload with at most fraction_bits[node] fraction bits (default hardware.loihi2.PAYLOAD_FRACTION_BITS;
    passes.deployment.fit_payload_grids chooses them); a one-line SpikecompileError naming the site or matrix that
    no format can hold."""
    target = target or load_loihi2()
    fraction_bits = fraction_bits or {}
    sites, synapses, sources = {}, {}, {}
    for name in graph.topological_order():
        node = graph[name]
        if isinstance(node, PhaseNeuron):
            node.refuse_token_scales("Loihi 2's fixed-point formats")
            sites[name] = site_format(node, target, node.site, fraction_bits.get(name, PAYLOAD_FRACTION_BITS))
        elif is_synapse(graph, name):
            if node.bias is not None:
                raise SpikecompileError(f"matrix {name}: a Linear with a bias; Loihi 2 synapses carry none, so it "
                                        f"cannot be deployed: build the sim, nir or onnx target instead")
            sources[name] = graph.inputs(name)["x"]
            synapses[name] = synapse_format(name, node.weight.resolve(store).detach().double().numpy(), target)
    return Formats(sites, synapses, sources)


def _place(units: nx.DiGraph, target: Loihi2) -> tuple[list[dict[str, int]], dict[str, list]]:
    """(cores: the units on each core {unit: neurons or rows}; where: a site's pieces [(core, first, end)] of
    its neurons, a synapse layer's cores [slice][row block]), packed as docs/loihi2.md says."""
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
                      "grid per site from potential_level (v0 of either sign and any size, docs/loihi2.md)",
    "counter_bits": "neuron.reference.magnitude_spikes' spike budget: s_t needs Σ_{u<t} s_u < K, a count 0..K of "
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


# ---- the pass -------------------------------------------------------------------------------------------------------

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
    if not is_count(value, 1):
        raise SpikecompileError(f"{what} must be an integer ≥ 1, got {value!r}")
    return value
