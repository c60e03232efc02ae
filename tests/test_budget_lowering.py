"""The generalised phase neuron (issue #7's coding zoo: a spike budget K and an initial potential v0 of any sign
and size) as the backends see it: the zoo's test neurons and graphs (the NIR, ONNX, Lava and Loihi-mapping tests
import ZOO, zoo_neurons and zoo_graph from here), and the histogram overlay's level enumeration
(backends/sim/report.py) against brute force through phase_quantize on dense grids."""

import dataclasses
import itertools

import pytest
import torch
from spikecompile.backends.sim.report import reachable_levels

from spikecompile.ir import Graph, PhaseNeuron
from spikecompile.neuron import (
    PhaseNeuronParams, base2_params, even_genotype, initial_potential, magnitude_spikes, phase_quantize,
    step_schedule,
)

ZOO = ("spikedattn", "ttfs", "rate", "sdllm", "negative_v0", "large_v0")
"""The variants zoo_neurons and zoo_graph make: base 2 with K = 2 (spikedattn) and K = 1 (ttfs); bases 1 with
v0 = ½τ (rate) and with a negative v0 and K = T − 1 (sdllm's clipped membrane and its budget); fitted bases with
v0 < 0 and K = 2, and with v0 above the late thresholds θ(t) (so θ(t) − v0 < 0: a zero input fires)."""


def zoo_variant(variant: str, tau: torch.Tensor, T: int, bases: dict[str, torch.Tensor]) -> dict:
    """The PhaseNeuronParams fields (all but genotype) of `variant` for a site of scale tau with these bases."""
    tau = torch.as_tensor(tau, dtype=torch.float32)
    n = bases["d"].numel() if bases["d"].ndim else 1
    twos, ones = torch.full((n,), 2.0), torch.ones(n)
    if variant in ("spikedattn", "ttfs"):
        return {"tau": tau, "d": twos, "h": twos.clone(), "theta": twos.clone(), "v0": initial_potential(tau, T),
                "max_spikes": torch.tensor(2 if variant == "spikedattn" else 1)}
    if variant in ("rate", "sdllm"):  # T + 1 uniform levels of step τ/T: the same range as the site's phase code
        step = tau / T
        v0, budget = (step / 2, 0) if variant == "rate" else (-step / 4, T - 1)
        return {"tau": step, "d": ones, "h": ones.clone(), "theta": ones.clone(), "v0": v0,
                "max_spikes": torch.tensor(budget)}
    if variant == "negative_v0":
        return {"tau": tau, **bases, "v0": -0.3 * tau * 2.0 ** -2, "max_spikes": torch.tensor(2)}
    if variant == "large_v0":
        return {"tau": tau, **bases, "v0": tau * 2.0 ** -4, "max_spikes": torch.tensor(0)}
    raise ValueError(variant)


FITTED = {"d": torch.tensor([2.0, 1.93]), "h": torch.tensor([2.06, 1.97]), "theta": torch.tensor([2.03, 1.98])}


def zoo_neurons(T: int = 6, tau: float = 0.8) -> dict[str, PhaseNeuronParams]:
    """One site's neuron (batch shape ()) of each ZOO variant at T steps."""
    genotype = even_genotype(T, 2)
    return {variant: PhaseNeuronParams(genotype=genotype, **zoo_variant(variant, torch.tensor(tau), T, FITTED))
            for variant in ZOO}


def zoo_node(node: PhaseNeuron, variant: str) -> PhaseNeuron:
    """The IR node with its scale and bases made `variant` (its genotype, grains and site kept)."""
    fields = zoo_variant(variant, node.tau, node.timesteps, {"d": node.d, "h": node.h, "theta": node.theta})
    fields["max_spikes"] = int(fields["max_spikes"])
    replaced = dataclasses.replace(node, **fields)
    replaced.check()
    return replaced


def zoo_graph(graph: Graph, variants=ZOO) -> Graph:
    """A copy of `graph` whose phase neurons cycle through `variants` in topological order."""
    result = graph.copy()
    cycle = itertools.cycle(variants)
    for name in graph.topological_order():
        if isinstance(graph[name], PhaseNeuron):
            result.replace(name, zoo_node(graph[name], next(cycle)))
    return result


def test_the_zoo_neurons_are_what_they_say():
    neurons = zoo_neurons(T=6)
    for variant, params in neurons.items():
        spikes = torch.stack(list(magnitude_spikes(torch.linspace(0, 2.0, 4001), params)))
        budget = int(params.max_spikes)
        assert spikes.sum(0).max() == (budget or 6), variant  # saturation: every step, or K of them
    assert (neurons["large_v0"].thresholds() < 0).any() and (neurons["large_v0"].thresholds() > 0).any()
    assert float(neurons["sdllm"].v0) < 0 and float(neurons["negative_v0"].v0) < 0
    rate = neurons["rate"]
    grid = torch.linspace(-1.0, 1.0, 20001)
    assert torch.unique(phase_quantize(grid, rate)).numel() == 2 * 6 + 1  # T + 1 levels a sign


# ---- the histogram overlay: exact with a budget and any v0 ----------------------------------------------------------

def _brute_force(neuron: PhaseNeuronParams, low: float, high: float, points: int) -> torch.Tensor:
    """The distinct outputs of phase_quantize on a dense grid of [low, high], its ends, every threshold crossing
    point in range and its float32 neighbours."""
    grid = torch.linspace(low, high, points)
    _, reset, _ = step_schedule(neuron)
    cuts = neuron.thresholds() + torch.cat([torch.zeros(1), reset.cumsum(0)[:-1]])  # all-fire prefix resets
    special = torch.cat([cuts, torch.nextafter(cuts, torch.tensor(float("inf"))), -cuts,
                         torch.tensor([low, high, 0.0])])
    special = special[(special >= low) & (special <= high)]
    return torch.unique(phase_quantize(torch.cat([grid, special]), neuron))


@pytest.mark.parametrize("variant", ZOO)
def test_overlay_levels_equal_brute_force_for_every_zoo_neuron(variant):
    neuron = zoo_neurons(T=6)[variant]
    for low, high in ((-1.75, 1.5), (0.1875, 0.3125), (-0.3125, -0.0625), (0.0, 0.5)):  # float32-exact ends
        expected = _brute_force(neuron, low, high, 400_001)
        assert torch.equal(reachable_levels(neuron, low, high), expected), (variant, low, high)


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_a_budget_removes_exactly_the_patterns_with_more_than_k_spikes(budget):
    """Random fitted bases, negative and positive v0: the enumeration keeps no pattern of more than K spikes and
    misses none that the grid reaches."""
    generator = torch.Generator().manual_seed(budget)
    for v0_scale in (-0.2, 0.0, 0.05):
        bases = {name: 1.7 + 0.6 * torch.rand(2, generator=generator) for name in ("d", "h", "theta")}
        neuron = PhaseNeuronParams(tau=torch.tensor(1.3), genotype=even_genotype(6, 2), **bases,
                                   v0=torch.tensor(v0_scale * 1.3), max_spikes=torch.tensor(budget))
        expected = _brute_force(neuron, -1.5, 1.5, 600_001)
        assert torch.equal(reachable_levels(neuron, -1.5, 1.5), expected), v0_scale


def test_the_budget_caps_base2_at_k_ones():
    """Base 2 with K spikes: exactly the codes of at most K ones among T bits (up to 2·Σ_{k≤K} C(T, k) − 1
    signed levels), the all-range case."""
    import math

    for budget in (1, 2, 3):
        neuron = dataclasses.replace(base2_params(1.0, 5), max_spikes=torch.tensor(budget))
        levels = reachable_levels(neuron, -1.0, 1.0)
        codes = sum(math.comb(5, k) for k in range(budget + 1))
        assert levels.numel() == 2 * codes - 1
        ones = (levels.abs() * 32).round().int()
        assert max(int(code).bit_count() for code in ones) == budget


@pytest.mark.parametrize("budget", [0, 3])
def test_levels_are_exact_where_float32_cannot_resolve_the_cuts(budget):
    """v0 = −1000τ (far below: a zero bin 1000τ wide) and T = 16: past 1000τ the float32 magnitudes are 2^-14·τ
    apart, coarser than the late thresholds τ·2^-(t+1), so most of the 2^16 spike patterns belong to no float32
    input. Every float32 magnitude in range is tried: the levels are exactly theirs."""
    neuron = dataclasses.replace(base2_params(1.0, 16), v0=torch.tensor(-1000.0), max_spikes=torch.tensor(budget))
    low, high = torch.tensor(1000.0), torch.tensor(1001.75)
    codes = torch.arange(int(low.view(torch.int32)), int(high.view(torch.int32)) + 1, dtype=torch.int32)
    every = torch.cat([codes.view(torch.float32), torch.tensor([0.0, 1.0, 999.0])])  # and the zero bin
    expected = torch.unique(torch.cat([phase_quantize(every, neuron), phase_quantize(-every, neuron)]))
    levels = reachable_levels(neuron, -1001.75, 1001.75)
    assert torch.equal(levels, expected)
    assert levels.numel() < 2 * 2 ** 16 - 1 or budget  # fewer than the codes a real-valued m would reach


@pytest.mark.parametrize("coding", ["las", "spikedattn", "ttfs", "rate", "sdllm"])
def test_overlay_levels_of_the_packaged_codings(coding):
    """conversion.codings' own neurons (sdllm with a membrane clipping c > τ/2: v0 = τ/2 − c < 0)."""
    from spikecompile.conversion.codings import coding_params

    clip = torch.tensor(0.3) if coding == "sdllm" else None
    neuron = coding_params(coding, torch.tensor(0.25 if coding in ("rate", "sdllm") else 1.5), 8, clip=clip)
    if coding == "sdllm":
        assert float(neuron.v0) < 0 and int(neuron.max_spikes) == 7
    expected = _brute_force(neuron, -2.5, 2.5, 400_001)
    assert torch.equal(reachable_levels(neuron, -2.5, 2.5), expected)
