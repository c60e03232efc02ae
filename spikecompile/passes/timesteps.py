"""assign_timesteps: give every node the number of steps T it runs in event form.

A spike site runs the T its neuron was fitted with, unless the `timesteps` option (every site) or the `sites`
option (one site each: {"layers.3.silu": 10}, ["layers.3.silu=10"] from the CLI, or a TOML file holding a
[sites] table) asks for another. Every other node runs the T of the spike trains it processes: the IR's rule
(ir.base.IRNode) is that an edge joins nodes running the same T, except into a phase neuron, which integrates
its whole input window and fires its own T. So the edges not into a neuron split the graph into lockstep
groups; each group runs the T of the neurons that feed it (they must agree), and a group fed by no neuron (the
embedding before the first site, when nothing else joins it) runs the global T.

Changing a site's T: a fitted phase neuron's bases and genotype are optimised for its T and have no principled
extension to another T, so the override is refused (refit with `spikecompile convert -T`). An all-base-2 (LAS)
neuron is a uniform quantizer of the range τ, step τ·2^-T; it is re-derived at the new T from its τ (same
range, finer or coarser step), with its grains split evenly over the new steps.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import networkx as nx
import torch

from ..errors import SpikecompileError
from ..ir import Graph, PhaseNeuron, validate
from ..modelschema import TIMESTEP_RANGE
from ..neuron import base2_params
from .manager import Pass, PassContext, PassResult, register_pass


def check_timesteps(value, what: str) -> int:
    """`value` as a T in TIMESTEP_RANGE; SpikecompileError naming `what` otherwise."""
    low, high = TIMESTEP_RANGE
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise SpikecompileError(f"{what}: T={value!r} is outside {low}..{high}")
    return value


def parse_site_overrides(value) -> dict[str, int]:
    """Per-site T from a mapping {site: T}, CLI strings ["site=T", ...], or the path of a TOML file whose
    [sites] table maps site names to T."""
    where = ""
    if isinstance(value, str | Path):
        value, where = read_overrides_toml(value), f"{value}: sites."
    elif not isinstance(value, Mapping):
        value = dict(_split_assignment(item) for item in value)
    overrides = {}
    for site, steps in value.items():
        if not isinstance(site, str) or not site:
            raise SpikecompileError(f"a site name must be a non-empty string, got {site!r}")
        overrides[site] = check_timesteps(steps, f"{where}{site}" if where else f"site {site}")
    return overrides


def read_overrides_toml(path: str | Path) -> dict:
    """The [sites] table of a TOML file, e.g. `[sites]` then `"layers.3.silu" = 10`."""
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise SpikecompileError(f"{path}: cannot read the timestep overrides ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise SpikecompileError(f"{path}: not a TOML file of timestep overrides (not UTF-8 text, at byte "
                                f"{error.start})") from None
    except tomllib.TOMLDecodeError as error:
        raise SpikecompileError(f"{path}: not valid TOML ({error})") from None
    sites = document.get("sites")
    if not isinstance(sites, dict) or set(document) != {"sites"}:
        raise SpikecompileError(f"{path}: expected one [sites] table mapping site names to T, "
                                f'e.g. [sites] "layers.3.silu" = 10')
    return sites


def _split_assignment(item) -> tuple[str, str]:
    site, equals, steps = item.partition("=") if isinstance(item, str) else ("", "", "")
    if not equals or not site.strip():
        raise SpikecompileError(f"timestep override {item!r} is not of the form SITE=T, e.g. layers.3.silu=10")
    return site.strip(), steps.strip()


@register_pass
class AssignTimesteps(Pass):
    name = "assign_timesteps"
    description = "set T on every node: each site's fitted T or its override, propagated along lockstep edges"
    options: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "timesteps": lambda value: check_timesteps(value, "global timesteps"), "sites": parse_site_overrides}

    def ensures(self, graph: Graph) -> None:
        missing = [name for name in graph if graph[name].timesteps is None]
        if missing:
            raise SpikecompileError(f"node {missing[0]}: no timesteps assigned ({len(missing)} nodes without)")
        validate(graph)

    def run(self, graph: Graph, context: PassContext) -> PassResult:
        neurons = {graph[name].site: name for name in graph if isinstance(graph[name], PhaseNeuron)}
        overrides = context.options.get("sites", {})
        for site in overrides:
            _check_site(site, neurons)
        default = context.options.get("timesteps")
        wanted = {name: overrides.get(site, default or graph[name].timesteps) for site, name in neurons.items()}
        result = graph.copy()
        for name, steps in wanted.items():
            result.replace(name, _at_timesteps(graph[name], steps))
        fitted = {graph[name].timesteps for name in neurons.values()}
        fallback = default or (fitted.pop() if len(fitted) == 1 else None)
        lockstep = _lockstep_graph(result)
        for group in nx.connected_components(lockstep):
            steps = _group_timesteps(result, lockstep, group, wanted, fallback)
            for name in group:
                if name not in wanted:
                    result.replace(name, dataclasses.replace(result[name], timesteps=steps))
        modified = any(result[name].timesteps != graph[name].timesteps for name in graph)
        changed = sorted(site for site, name in neurons.items() if wanted[name] != graph[name].timesteps)
        return PassResult(result, modified, {"timesteps": sorted(set(wanted.values()) | ({fallback} - {None})),
                                             "sites_changed": changed})


def check_overrides(neurons: Mapping[str, PhaseNeuron], sites: Mapping[str, int], timesteps: int | None,
                    where: str = "the graph") -> None:
    """What the pass would refuse, checked on the neurons alone ({site: neuron}, e.g. from model.pt's site table,
    before any model is loaded): a site override naming no site of `where`, or a neuron asked to run at a T it
    cannot (a fitted one at another T)."""
    for site in sites:
        _check_site(site, neurons, where)
    for site, neuron in neurons.items():
        steps = sites.get(site, timesteps)
        if steps is None:
            continue
        try:
            _at_timesteps(neuron, steps)
        except SpikecompileError as error:
            asked = f"timestep override {site}={steps}" if site in sites else f"-T {steps}"
            raise SpikecompileError(f"{asked}: {error}") from None


def _check_site(site: str, neurons: Mapping[str, object], where: str = "the graph") -> None:
    if site in neurons:
        return
    close = difflib.get_close_matches(site, neurons, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"sites are named like {next(iter(neurons), 'none')}"
    raise SpikecompileError(f"timestep override for site {site}: no such spike site in {where}; {hint}")


def is_base2(neuron: PhaseNeuron) -> bool:
    return all(bool((getattr(neuron, base) == 2).all()) for base in ("d", "h", "theta"))


def _at_timesteps(neuron: PhaseNeuron, steps: int) -> PhaseNeuron:
    """The neuron running `steps` steps: itself, or an all-base-2 neuron re-derived from its τ (module docstring)."""
    if steps == neuron.timesteps:
        return neuron
    if not (is_base2(neuron) and neuron.has_default_v0):
        raise SpikecompileError(f"site {neuron.site}: its phase neuron was fitted at T={neuron.timesteps} and cannot "
                                f"run at T={steps}; only all-base-2 sites (las, spikedattn, ttfs) are re-derived at "
                                f"another T. "
                                f"Convert again with -T {steps}, or drop the override")
    grains = min(neuron.d.shape[-1], steps)
    params = base2_params(neuron.tau.detach().clone(), steps, grains)
    if neuron.max_spikes:  # spikedattn, ttfs: the same budget at the new T
        params = dataclasses.replace(params, max_spikes=torch.tensor(neuron.max_spikes))
    params = dataclasses.replace(params, signed_digits=neuron.signed_digits)  # phase-sd base 2: signed at any T
    return PhaseNeuron.from_params(neuron.site, params)


def lockstep_groups(graph: Graph) -> list[list[str]]:
    """The spike sites that must run one T, one sorted list per group (their trains meet in a lockstep group),
    in the graph's order of their first site."""
    lockstep = _lockstep_graph(graph)
    groups = [sorted(graph[name].site for name in group if isinstance(graph[name], PhaseNeuron))
              for group in nx.connected_components(lockstep)]
    order = {graph[name].site: index for index, name in enumerate(graph.topological_order())
             if isinstance(graph[name], PhaseNeuron)}
    return sorted((group for group in groups if group), key=lambda group: min(order[site] for site in group))


def _lockstep_graph(graph: Graph) -> nx.Graph:
    """The edges that must carry the same T on both ends (all but those into a neuron), undirected: each
    component runs one T."""
    lockstep = nx.Graph()
    lockstep.add_nodes_from(graph)
    lockstep.add_edges_from((source, target) for source, target, _ in graph.edges()
                            if not graph[target].integrates_input)
    return lockstep


def _group_timesteps(graph: Graph, lockstep: nx.Graph, group: set[str], wanted: dict[str, int],
                     fallback: int | None) -> int:
    """The one T the neurons feeding `group` fire; SpikecompileError naming two that disagree and where they meet."""
    feeding = sorted(name for name in group if name in wanted)
    if not feeding:
        if fallback is None:
            raise SpikecompileError(f"node {min(group)}: no spike site sets its T and the sites' fitted T differ; "
                                    f"give the global timesteps option")
        return fallback
    first = feeding[0]
    for other in feeding[1:]:
        if wanted[other] != wanted[first]:
            path = nx.shortest_path(lockstep, first, other)
            # where the two trains join: a node fed by both of its neighbours on the path
            meeting = next((path[i] for i in range(1, len(path) - 1)
                            if graph.has_edge(path[i - 1], path[i]) and graph.has_edge(path[i + 1], path[i])),
                           path[1])
            raise SpikecompileError(f"sites {graph[first].site} (T={wanted[first]}) and {graph[other].site} "
                                    f"(T={wanted[other]}) feed spike trains that meet at {meeting}, which needs one "
                                    f"T; give both sites the same T")
    return wanted[first]
