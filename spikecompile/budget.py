"""The cost side of per-site budgets (conversion/budget.py): the project's own ledger on the model's analytic graph.

A budget is one of
    spikes_per_mac  F: the SNN's accumulates (ACs) per ANN MAC, both counted by backends/sim/counting.py
    energy          F: the SNN's compute-tier energy E_MAC·#MAC + E_AC·#AC over the ANN's (backends/sim/ledger.py,
                    on an energy target, cmos45nm by default)
for one sequence of `seq_len` tokens. `LedgerCost.measure` is exact for the analytic mode: the model's graph
traced from its config (analytic.config_graph), each site at its own T (the assign_timesteps pass re-derives the
base-2 neurons it holds), each site firing its calibration spikes per activation spread evenly over its steps
(analytic_run with per-site rates). `linear` reads the coefficients of conversion.budget.LinearCost off the same
ledger by differences: a site kind's cost per spike, a tie group's cost per step.
"""

from __future__ import annotations

from collections.abc import Mapping

from .analytic import config_graph
from .backends.sim.analytic import analytic_run
from .backends.sim.ledger import tier_energies
from .backends.sim.results import Counts
from .conversion.budget import BUDGET_KINDS, TIMESTEP_CHOICES, LinearCost
from .hardware.energy import load_target
from .ir import PhaseNeuron
from .passes import PassManager
from .passes.timesteps import lockstep_groups

class LedgerCost:
    """The measure of a per-site allocation on the analytic graph of `config` (a config.json dict): kind is
    conversion.budget.BUDGET_KINDS' "spikes_per_mac" or "energy" (priced on the energy `target`)."""

    def __init__(self, config: Mapping, kind: str, seq_len: int, grains: int = 2, target: str = "cmos45nm"):
        if kind not in BUDGET_KINDS:
            raise ValueError(f"LedgerCost: kind must be one of {tuple(BUDGET_KINDS)}, got {kind!r}")
        self.kind = kind
        self.seq_len = seq_len
        self.graph = config_graph(config, TIMESTEP_CHOICES[-1], grains)
        self.sites = {self.graph[name].site: self.graph[name] for name in self.graph
                      if isinstance(self.graph[name], PhaseNeuron)}
        self.groups = lockstep_groups(self.graph)
        self.target = load_target(target) if kind == "energy" else None

    def measure(self, timesteps: Mapping[str, int], spikes: Mapping[str, float]) -> float:
        """The budget's quantity for sites at `timesteps` firing `spikes` per activation (per site)."""
        graph, _ = PassManager(["assign_timesteps"], options={"assign_timesteps": {"sites": dict(timesteps)}}
                               ).run(self.graph)
        rates = {site: min(1.0, spikes[site] / timesteps[site]) for site in self.sites}
        run = analytic_run(graph, self.seq_len, rates)
        snn, ann = (sum(counts.values(), Counts()) for counts in (run.snn, run.ann))
        if self.kind == "spikes_per_mac":
            return snn.ac / ann.mac
        return tier_energies(snn, self.target)["compute"] / tier_energies(ann, self.target)["compute"]

    def linear(self) -> LinearCost:
        """Coefficients by differences from every site at T = 8 firing nothing: one run per site kind (one spike
        per activation at every site of that kind) and one per tie-group shape (its T one step higher)."""
        base_steps = 8
        uniform = dict.fromkeys(self.sites, base_steps)
        silent = dict.fromkeys(self.sites, 0.0)
        base = self.measure(uniform, silent)
        per_spike = {}
        for kind in sorted({neuron.kind for neuron in self.sites.values()}):
            members = [site for site, neuron in self.sites.items() if neuron.kind == kind]
            delta = self.measure(uniform, {**silent, **dict.fromkeys(members, 1.0)}) - base
            per_spike.update(dict.fromkeys(members, delta / len(members)))
        per_step, by_shape = [], {}
        for group in self.groups:
            shape = tuple(sorted(self.sites[site].kind for site in group))
            if shape not in by_shape:
                alike = [other for other in self.groups
                         if tuple(sorted(self.sites[site].kind for site in other)) == shape]
                raised = {**uniform, **{site: base_steps + 1 for other in alike for site in other}}
                by_shape[shape] = (self.measure(raised, silent) - base) / len(alike)
            per_step.append(by_shape[shape])
        constant = base - sum(per_step) * base_steps
        return LinearCost(per_spike=per_spike, per_step=per_step, constant=constant)
