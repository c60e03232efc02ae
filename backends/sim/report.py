"""The run report: report.json (everything), report.md (convention, ledger tables, firing rates) and PNG plots.

Plots (matplotlib Figure + Agg canvas, no pyplot state; fixed DPI, no Software tag, so the bytes repeat):
firing rate per layer and site kind; energy per tier, ANN vs SNN; and for one chosen site the activation
histogram (log count) with its neuron's output values overlaid (the paper's Fig. 1 and 3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from spikecompile.errors import SpikecompileError
from spikecompile.files import atomic_write
from spikecompile.neuron import PhaseNeuronParams, step_schedule, weighted_spike_sum

from .ledger import TIERS
from .results import OUTSIDE_LAYERS, SimRun, firing_rates

FORMAT = "spikecompile.report"
FORMAT_VERSION = 1
DPI = 100
HISTOGRAM_BINS = 200
SIDE_LABELS = {"snn": "SNN", "ann": "ANN", "ann_int8": "ANN int8"}


def write_report(run: SimRun, ledger_dict: dict, folder: str | Path, site: str | None = None,
                 samples: Tensor | None = None, neuron: PhaseNeuronParams | None = None) -> dict[str, Path]:
    """Write report.json, report.md, firing_rate.png, energy.png and, for `site` (with its calibration `samples`
    and its `neuron`), histogram.png into `folder`; return {what: path}. Every file is written atomically."""
    folder = _make_folder(folder)
    rates = firing_rates(run.sites)
    histogram = site_histogram(run, site, samples, neuron) if site is not None else None
    paths = {"firing_rate": folder / "firing_rate.png", "energy": folder / "energy.png"}
    _save_figure(firing_rate_figure(rates), paths["firing_rate"])
    _save_figure(energy_figure(ledger_dict), paths["energy"])
    if histogram is not None:
        paths["histogram"] = folder / "histogram.png"
        _save_figure(histogram_figure(histogram), paths["histogram"])
    paths["markdown"] = folder / "report.md"
    images = {name: path.name for name, path in paths.items() if path.suffix == ".png"}
    _write_text(paths["markdown"], markdown(ledger_dict, rates, histogram, images))
    paths["json"] = folder / "report.json"
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "tokens": run.tokens, "ledger": ledger_dict,
               "firing_rates": rates, "sites": run.sites, "histogram": histogram,
               "files": {name: path.name for name, path in paths.items()}}
    _write_text(paths["json"], json.dumps(payload, indent=2, default=float) + "\n")
    return paths


def reachable_levels(neuron: PhaseNeuronParams, low: float, high: float) -> Tensor:
    """Every output value x̂ the neuron gives for some x in [low, high], sorted (in τ's dtype, exact).

    The magnitude m = |x| drives a decision tree: at step t a branch (an interval of magnitudes sharing the spikes
    s_0..s_{t−1}) splits where its residual r_t = m − Σ_{u<t} h(u)·s_u, taken in the neuron's own float arithmetic,
    passes θ(t) − v0 — the cut may have either sign: v0 < 0 raises it, v0 > θ(t) makes it negative so every m
    fires — unless the branch has spent the budget K (max_spikes > 0): then it stays quiet, so no pattern of more
    than K spikes is made. Its value Σ_t d(t)·s_t is summed exactly as the neuron sums it. Intervals are sets of
    consecutive floats and each cut is found by bisection over them (r_t is nondecreasing in m), so the levels
    are exactly those of the float magnitudes in range: [max(low, 0), high] for x > 0, [max(−high, 0), −low] for
    x < 0, and 0 when the range holds it.
    """
    if neuron.batch_shape != ():
        raise ValueError(f"reachable_levels: one site's neuron (batch shape ()), got {tuple(neuron.batch_shape)}")
    if neuron.signed_digits:
        raise ValueError("reachable_levels: the enumeration follows |x| through the unsigned neuron; a signed-digit "
                         "neuron's potential keeps its sign")
    levels = [torch.zeros(1, dtype=neuron.tau.dtype)] if low <= 0 <= high else []
    if high > 0:
        levels.append(_magnitude_levels(neuron, max(low, 0.0), high))
    if low < 0:
        levels.append(-_magnitude_levels(neuron, max(-high, 0.0), -low))
    return torch.unique(torch.cat(levels))


_CODES = {torch.float32: torch.int32, torch.float64: torch.int64}
"""The integer view of each float dtype the enumeration handles: for floats ≥ 0 its order is the floats' order."""


def _magnitude_levels(neuron: PhaseNeuronParams, bottom: float, top: float) -> Tensor:
    """The values Σ_t d(t)·s_t of the spike patterns that magnitudes m in [bottom, top], m > 0, produce.

    Branches are code ranges [first, last] (codes: the floats' bit patterns as integers) of the magnitudes that
    share the branch's spikes so far; `spent` counts those spikes against the budget."""
    dtype = neuron.tau.dtype
    if dtype not in _CODES:
        raise ValueError(f"reachable_levels: a neuron in {dtype}; the enumeration handles {', '.join(map(str, _CODES))}")
    _, reset, _ = step_schedule(neuron)
    threshold, budget = neuron.thresholds(), int(neuron.max_spikes)
    first, last = _code(bottom, dtype, up=True), _code(top, dtype, up=False)
    first = max(first, 1)  # m > 0: x = 0 gives 0 whatever fires
    if first > last:
        return torch.zeros(0, dtype=dtype)
    low, high = torch.tensor([first]), torch.tensor([last])
    patterns, spent = torch.zeros(1, 0, dtype=dtype), torch.zeros(1, dtype=torch.int64)
    for t in range(neuron.T):
        cut = _first_firing(low, high, patterns, reset, threshold[t], dtype)
        if budget:
            cut = torch.where(spent < budget, cut, high + 1)  # a spent branch stays quiet
        quiet, firing = cut > low, cut <= high
        low, high = torch.cat([low[quiet], cut[firing]]), torch.cat([cut[quiet] - 1, high[firing]])
        spent = torch.cat([spent[quiet], spent[firing] + 1])
        spike = torch.cat([torch.zeros(int(quiet.sum())), torch.ones(int(firing.sum()))]).to(dtype)
        patterns = torch.cat([torch.cat([patterns[quiet], patterns[firing]]), spike[:, None]], dim=1)
    return weighted_spike_sum(neuron, patterns.T, torch.zeros(patterns.shape[0], dtype=dtype))


def _first_firing(low: Tensor, high: Tensor, patterns: Tensor, reset: Tensor, threshold: Tensor,
                  dtype: torch.dtype) -> Tensor:
    """Per branch, the code of the smallest magnitude in [low, high] whose residual after the branch's resets
    (neuron.reference.magnitude_spikes' arithmetic) is above `threshold`; high + 1 where none is."""
    def fires(codes: Tensor) -> Tensor:
        residual = codes.to(_CODES[dtype]).view(dtype)
        for u in range(patterns.shape[1]):
            residual = torch.addcmul(residual, reset[u], patterns[:, u], value=-1)
        return residual > threshold

    lo, hi = low.clone(), high + 1
    while bool((lo < hi).any()):
        mid = torch.minimum(lo + (hi - lo) // 2, high)
        active = lo < hi
        hit = fires(mid)
        hi = torch.where(active & hit, mid, hi)
        lo = torch.where(active & ~hit, mid + 1, lo)
    return lo


def _code(value: float, dtype: torch.dtype, up: bool) -> int:
    """The code of the float of `dtype` nearest `value` on the inside: the smallest ≥ value (up) or the largest ≤
    value (not up); value ≥ 0."""
    near = torch.tensor(value, dtype=torch.float64).to(dtype)
    if up and float(near) < value or not up and float(near) > value:
        near = torch.nextafter(near, torch.tensor(math.inf if up else -math.inf, dtype=dtype))
    return int(near.view(_CODES[dtype]))


def site_histogram(run: SimRun, site: str, samples: Tensor | None, neuron: PhaseNeuronParams | None,
                   bins: int = HISTOGRAM_BINS) -> dict:
    """{site, kind, layer, T, grains, range, edges, counts, levels}: the samples' histogram over their range and
    the neuron's output values reachable from that range (reachable_levels)."""
    if site not in run.sites:
        raise SpikecompileError(f"site {site!r} unknown: give one of {', '.join(sorted(run.sites)[:5])}, …")
    if samples is None or neuron is None:
        raise ValueError(f"site_histogram: site {site} needs its calibration samples and its neuron")
    if neuron.signed_digits:  # checked before any output is written: the report folder is made whole or not at all
        raise SpikecompileError(f"--site {site}: a signed-digit site (--coding phase-sd); the histogram's level "
                                f"overlay enumerates the unsigned phase neuron only: report without --site")
    samples = samples.detach().flatten().float()
    if samples.numel() == 0 or not bool(torch.isfinite(samples).all()):
        raise SpikecompileError(f"site {site}: no finite calibration samples stored; re-convert the model")
    low, high = float(samples.min()), float(samples.max())
    counts = torch.histc(samples, bins=bins, min=low, max=high) if high > low else torch.tensor([samples.numel()])
    edges = torch.linspace(low, high, counts.numel() + 1)
    levels = reachable_levels(neuron, low, high)
    return {"site": site, "kind": run.sites[site]["kind"], "layer": run.sites[site]["layer"], "T": neuron.T,
            "grains": neuron.n_grains, "range": [low, high], "edges": edges.tolist(), "counts": counts.tolist(),
            "levels": levels.tolist()}


def firing_rate_figure(rates: dict) -> Figure:
    """Firing rate (%) per layer, one line per site kind."""
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    positions = {layer: index for index, layer in enumerate(rates["layers"])}
    for kind, by_layer in rates["by_layer"].items():
        axes.plot([positions[layer] for layer in by_layer], [100 * rate for rate in by_layer.values()],
                  marker="o", label=kind)
    axes.set_xticks(range(len(positions)), list(positions))
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("firing rate (%)")
    axes.set_ylim(bottom=0)
    axes.set_title(f"Firing rate per layer and site kind (overall {100 * rates['overall']:.2f}%)")
    axes.legend(fontsize="small", ncols=2)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def energy_figure(ledger_dict: dict) -> Figure:
    """Energy per sequence in each tier, ANN and SNN bars side by side, SNN/ANN written above."""
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    total = ledger_dict["total"]
    sides = [side for side in ("ann_int8", "ann", "snn") if side in total]
    width = 0.8 / len(sides)
    for number, side in enumerate(sides):
        offset = (number - (len(sides) - 1) / 2) * width
        values = [total[side]["per_sequence"][tier] for tier in TIERS]
        bars = axes.bar([index + offset for index in range(len(TIERS))], values, width, label=SIDE_LABELS[side])
        if side == "snn":
            ratios = [total["snn_over_ann"][tier] for tier in TIERS]
            axes.bar_label(bars, [f"×{ratio:.2f}" if ratio is not None else "" for ratio in ratios], fontsize=8)
    axes.set_xticks(range(len(TIERS)), list(TIERS.values()))
    axes.set_ylabel(f"energy per sequence of {ledger_dict['tokens']} tokens ({ledger_dict['unit']})")
    axes.set_title(f"Energy, ANNs vs SNN ({ledger_dict['target']['name']}, attention {ledger_dict['attention']})")
    axes.legend()
    figure.tight_layout()
    return figure


def histogram_figure(histogram: dict) -> Figure:
    """Activation histogram (log count) with the neuron's output values as vertical lines (paper Fig. 1/3)."""
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    edges, counts = histogram["edges"], histogram["counts"]
    axes.hist(edges[:-1], bins=edges, weights=counts, log=True, color="tab:blue", alpha=0.8, label="calibration")
    axes.vlines(histogram["levels"], 0, 1, transform=axes.get_xaxis_transform(), colors="tab:red", linewidth=0.6,
                alpha=0.7, label=f"neuron output values ({len(histogram['levels'])})")
    axes.set_xlabel("activation")
    axes.set_ylabel("count (log)")
    axes.set_title(f"{histogram['site']} (T={histogram['T']}, {histogram['grains']} grains)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def markdown(ledger_dict: dict, rates: dict, histogram: dict | None, images: dict[str, str]) -> str:
    """The human report: ledger ANN vs SNN per tier, counts, per layer, firing rates, histogram, convention."""
    target = ledger_dict["target"]
    parts = [
        "# spikecompile report\n",
        (f"One sequence of L = {ledger_dict['tokens']} tokens; target {target['name']} ({target['file']}); "
         f"attention counted {ledger_dict['attention']}; energies in {ledger_dict['unit']}. "
         f"The counting convention is at the end.\n"),
        "## Energy: ANN vs SNN\n", _tier_table(ledger_dict), f"![energy]({images['energy']})\n",
        "## Counts per sequence\n", _counts_table(ledger_dict["total"]["counts"]),
        "## Per layer (J per sequence)\n", _layer_table(ledger_dict),
        "## Firing rates\n",
        f"Overall: {_percent(rates['overall'])} of elements × timesteps spike.\n", _rate_table(rates),
        f"![firing rate]({images['firing_rate']})\n",
    ]
    if histogram is not None:
        parts += [f"## Activation histogram: {histogram['site']}\n",
                  (f"{sum(histogram['counts']):.0f} calibration samples in [{histogram['range'][0]:.4g}, "
                   f"{histogram['range'][1]:.4g}]; {len(histogram['levels'])} neuron output values reachable "
                   f"from that range (T={histogram['T']}, {histogram['grains']} grains).\n"),
                  f"![histogram]({images['histogram']})\n"]
    parts += ["## Counting convention\n", ledger_dict["convention"]]
    return "\n".join(parts)


def _tier_table(ledger_dict: dict) -> str:
    """Per tier: each column's energy per sequence and per token, and the SNN over each ANN (fp32, int8)."""
    total = ledger_dict["total"]
    sides = [side for side in ("ann", "ann_int8", "snn") if side in total]
    anns = [side for side in sides if side != "snn"]
    rows = [[label, *(_joules(total[side][scope][tier]) for scope in ("per_sequence", "per_token") for side in sides),
             *(_ratio(total[f"snn_over_{side}"][tier]) for side in anns)]
            for tier, label in TIERS.items()]
    header = ["tier", *(f"{SIDE_LABELS[side]} per {scope}" for scope in ("sequence", "token") for side in sides),
              *(f"SNN / {SIDE_LABELS[side]}" for side in anns)]
    return _table(header, rows)


def _counts_table(counts: dict) -> str:
    rows = [[name, f"{counts['ann'][name]:.4g}", f"{counts['snn'][name]:.4g}"] for name in counts["snn"]]
    return _table(["count", "ANN", "SNN"], rows)


def _layer_table(ledger_dict: dict) -> str:
    header = ["layer", *(f"{side.upper()} {label}" for label in TIERS.values() for side in ("ann", "snn")),
              "SNN / ANN (+ memory)"]
    rows = [[OUTSIDE_LAYERS if entry["layer"] is None else str(entry["layer"]),
             *(_joules(entry[side]["per_sequence"][tier]) for tier in TIERS for side in ("ann", "snn")),
             _ratio(entry["snn_over_ann"]["memory"])] for entry in ledger_dict["layers"]]
    return _table(header, rows)


def _rate_table(rates: dict) -> str:
    kinds = list(rates["by_kind"])
    rows = [[layer, *(_percent(rates["by_layer"][kind][layer]) if layer in rates["by_layer"][kind] else ""
                      for kind in kinds)] for layer in rates["layers"]]
    rows.append(["all", *(_percent(rates["by_kind"][kind]) for kind in kinds)])
    return _table(["layer", *kinds], rows)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _joules(value: float) -> str:
    return f"{value:.4g}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _make_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SpikecompileError(f"{folder}: cannot create the report folder ({error.strerror})") from None
    return folder


def _save_figure(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=DPI, metadata={"Software": None}))


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
