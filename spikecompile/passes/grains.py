"""assign_grains: choose how each fitted spike site splits its T steps among its n grains, and refit its neuron.

A phase neuron's genotype g(t) gives each grain one contiguous block of steps (docs/method.md §1). With the
`search` option "darts" (default) every site's genotype comes from Algorithm 2 (conversion.allocation: a
DARTS-style search over every split into blocks of ≥ 2 steps, started at the site's error-minimising
base-2 τ); with "even" it is the even split (even_genotype), the fixed baseline to compare with. Then a fresh
neuron is fitted with that genotype on the site's calibration samples (fit_sites, batched over all sites), and
it replaces the site's neuron only where its MSE on those samples is ≤ the current neuron's: a site never gets
worse on its samples. `grains` changes the number of grains n (1 ≤ n ≤ T//2: each grain keeps ≥ 2 steps);
`sites` restricts the pass to the named sites.

All-base-2 (LAS) neurons are left as they are: with every base 2 each genotype is the same uniform quantizer;
so are the other fixed codings (conversion.codings: a spike budget or another v0).
"""

from __future__ import annotations

import difflib
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from ..conversion.allocation import SearchConfig, block_lengths, search_genotypes
from ..conversion.fit import _FIELDS, FitConfig, fit_sites, quantizer_mse
from ..errors import SpikecompileError
from ..ir import Graph, PhaseNeuron, validate
from ..neuron import PhaseNeuronParams, even_genotype
from .manager import Pass, PassContext, PassResult, register_pass
from .timesteps import is_base2

SEARCHES = ("darts", "even")


def parse_search(value) -> str:
    """"darts" (Algorithm 2) or "even" (the even split)."""
    if value not in SEARCHES:
        raise SpikecompileError(f"search must be one of {', '.join(SEARCHES)}, got {value!r}")
    return value


def parse_grains(value) -> int:
    """A number of grains n ≥ 1, as an int or its digits (from the CLI); n ≤ T//2 is checked per site."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise SpikecompileError(f"grains must be a whole number ≥ 1, got {value!r}")
    return value


def parse_sites(value) -> tuple[str, ...]:
    """Site names: a list, or one comma-separated string (from the CLI)."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not names:
        raise SpikecompileError(f"sites must be a non-empty list of site names, got {value!r}")
    if not all(isinstance(name, str) and name.strip() for name in names):
        raise SpikecompileError(f"every site name must be a non-empty string, got {value!r}")
    return tuple(dict.fromkeys(name.strip() for name in names))


@register_pass
class AssignGrains(Pass):
    name = "assign_grains"
    description = "choose each fitted site's split of its steps among grains (DARTS search or even) and refit"
    after = ("assign_timesteps",)
    options: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "search": parse_search, "grains": parse_grains, "sites": parse_sites}

    def ensures(self, graph: Graph) -> None:
        for name in graph:
            node = graph[name]
            if isinstance(node, PhaseNeuron) and not _is_blocks(node.genotype):
                raise SpikecompileError(f"site {node.site}: genotype {node.genotype.tolist()} is not one contiguous "
                                        f"block per grain, in grain order")
        validate(graph)

    def run(self, graph: Graph, context: PassContext) -> PassResult:
        neurons = {graph[name].site: name for name in graph if isinstance(graph[name], PhaseNeuron)}
        chosen = context.options.get("sites") or tuple(neurons)
        _check_sites(chosen, neurons)
        # base 2 (one quantizer whatever the split) and the fixed codings are left as they are
        unchanged = [site for site in chosen
                     if is_base2(graph[neurons[site]]) or not graph[neurons[site]].is_phase_coded]
        refit = [site for site in chosen if site not in unchanged]
        samples = _site_samples(context.shared, refit)
        search = context.options.get("search", "darts")
        seed = getattr(context.shared, "seed", 0)
        result, notes = graph.copy(), {}
        seconds = {"search": 0.0, "refit": 0.0}
        for (_, grains, _), sites in _groups(graph, neurons, samples, context.options.get("grains")).items():
            current = [graph[neurons[site]] for site in sites]
            for node, (neuron, note) in zip(current, _refit(current, samples, grains, search, seed, seconds),
                                            strict=True):
                notes[node.site] = note
                if neuron is not None:
                    result.replace(neurons[node.site], neuron)
        replaced = sum(note["replaced"] for note in notes.values())
        return PassResult(result, replaced > 0, {
            "search": search, "sites": notes, "replaced": replaced, "kept": len(notes) - replaced,
            "base2_unchanged": len(unchanged), "search_seconds": round(seconds["search"], 3),
            "refit_seconds": round(seconds["refit"], 3)})


def _is_blocks(genotype: torch.Tensor) -> bool:
    """g(t) starts at grain 0 and rises by 0 or 1 per step: one contiguous block per grain, in order."""
    steps_up = genotype.diff()
    return bool(genotype[0] == 0) and bool(((steps_up == 0) | (steps_up == 1)).all())


def _check_sites(chosen: tuple[str, ...], neurons: dict[str, str]) -> None:
    for site in chosen:
        if site not in neurons:
            close = difflib.get_close_matches(site, neurons, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"{len(neurons)} sites, e.g. {min(neurons, default='none')}"
            raise SpikecompileError(f"option sites: {site} is not a spike site of the graph; {hint}")


def _site_samples(shared, sites: list[str]) -> dict[str, torch.Tensor]:
    """Each site's calibration samples [N] as float32, from shared.samples (passes.CompileInputs)."""
    if not sites:
        return {}
    table = getattr(shared, "samples", None)
    if not table:
        raise SpikecompileError("assign_grains refits neurons on the sites' calibration samples, and none were "
                                "given: run it with shared=CompileInputs(store, samples=...) from model.pt")
    samples = {}
    for site in sites:
        values = table.get(site)
        if values is None:
            raise SpikecompileError(f"site {site}: no calibration samples in model.pt; convert again")
        if values.ndim != 1 or values.numel() == 0:
            raise SpikecompileError(f"site {site}: calibration samples must be a non-empty 1-D tensor, got shape "
                                    f"{list(values.shape)}")
        if not bool(torch.isfinite(values).all()):
            raise SpikecompileError(f"site {site}: its calibration samples in model.pt hold NaN or inf; convert "
                                    f"again, or run without --grain-search")
        samples[site] = values.to(torch.float32)
    return samples


def _groups(graph: Graph, neurons: dict[str, str], samples: dict[str, torch.Tensor],
            grains: int | None) -> dict[tuple[int, int, int], list[str]]:
    """Sites by (T, n, number of samples): each group is searched and refitted in one batch."""
    groups = defaultdict(list)
    for site in samples:
        node = graph[neurons[site]]
        steps, count = node.timesteps, grains or node.d.shape[-1]
        if count > steps // 2:
            what = "option grains" if grains else "its current grains"
            raise SpikecompileError(f"site {site}: {what} n={count} needs T ≥ {2 * count} (≥ 2 steps per grain), "
                                    f"but it runs T={steps}; choose grains ≤ {steps // 2}")
        groups[steps, count, len(samples[site])].append(site)
    return groups


def _refit(current: list[PhaseNeuron], samples: dict[str, torch.Tensor], grains: int, search: str, seed: int,
           seconds: dict[str, float]) -> list[tuple[PhaseNeuron | None, dict]]:
    """Per neuron of one (T, n, N) group: the refitted neuron where its MSE is ≤ the current one's (else None),
    and its note. Adds the time spent to seconds["search"] and seconds["refit"]."""
    steps = current[0].timesteps
    batch = torch.stack([samples[node.site] for node in current])
    start = time.perf_counter()
    genotypes = _genotypes(search, batch, steps, grains, seed)
    seconds["search"] += time.perf_counter() - start
    start = time.perf_counter()
    fit = fit_sites(batch, FitConfig(T=steps, n_grains=grains, seed=seed), genotypes=genotypes,
                    names=[node.site for node in current])
    seconds["refit"] += time.perf_counter() - start
    out = []
    for index, node in enumerate(current):
        old_mse, new_mse = float(quantizer_mse(batch[index], node.params())), float(fit.mse[index])
        better = new_mse <= old_mse
        out.append((PhaseNeuron.from_params(node.site, _site(fit.params, index)) if better else None,
                    {"genotype": block_lengths(genotypes[index]), "old_mse": old_mse, "new_mse": new_mse,
                     "replaced": better}))
    return out


def _genotypes(search: str, samples: torch.Tensor, steps: int, grains: int, seed: int) -> torch.Tensor:
    """[S, T] genotypes: Algorithm 2 from the base-2 τ that minimises each site's error, or the even split."""
    if search == "even":
        return even_genotype(steps, grains).expand(len(samples), steps).contiguous()
    tau = fit_sites(samples, FitConfig(T=steps, n_grains=grains, coding="las")).base2_tau
    return search_genotypes(samples, tau, steps, grains, SearchConfig(seed=seed))[0]


def _site(params: PhaseNeuronParams, index: int) -> PhaseNeuronParams:
    """Neuron `index` of a batch, in tensors of its own (not views of the batch)."""
    return PhaseNeuronParams(**{name: getattr(params, name)[index].clone() for name in _FIELDS})
