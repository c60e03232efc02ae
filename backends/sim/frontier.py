"""The accuracy–energy frontier (issue 16, item 5): perplexity ratio against cost, one point per converted model.

A measured point is one model.pt measured by the simulator and by `eval`:
  * `spikecompile build --target sim --mode decoded` over the evaluation windows (sim.json): the decoded
    perplexity of the deployed IR, and the counts, priced here again by the ledger on one energy target (three
    tiers, SNN over ANN, per token) and read as accumulates per ANN MAC (the SNN's #AC over the ANN's #MAC);
  * `spikecompile eval --json` on the same text, windows and sequence length: the two baselines, the float model
    without the prefix (the ANN) and the float model after the same KV prefix as the SNN (the conversion's own
    cost, the stricter one). Neither depends on the spike sites, so the eval of any conversion of the same source
    model with the same prefix serves.
Each cost axis (ACs per ANN MAC, and SNN/ANN at each tier) has its own Pareto set: the measured points that no
other measured point beats on that cost and on the ratio against the prefixed float model at once. Published
points (other models, other counting conventions) are drawn for orientation only, never in a Pareto set.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spikecompile.errors import SpikecompileError
from spikecompile.files import atomic_write
from spikecompile.hardware.energy import Target

from .ledger import TIERS, ledger
from .measure import load_run

FORMAT = "spikecompile.frontier"
FORMAT_VERSION = 1
DPI = 100
COSTS = ("acs_per_mac", *TIERS)  # the cost axes: ACs per ANN MAC, then SNN/ANN energy at each ledger tier
COST_LABELS = {"acs_per_mac": "ACs per ANN MAC", "compute": "SNN/ANN energy, compute only",
               "neuron": "SNN/ANN energy, + neuron state", "memory": "SNN/ANN energy, + memory traffic"}
RATIO_TOLERANCE = 1e-6  # relative: eval's windows and the simulator's are the same text, so their counts agree


@dataclass(frozen=True)
class FrontierPoint:
    """One point. Ratios are perplexity over perplexity; costs are `acs_per_mac` and SNN/ANN energy per tier.
    A published point has `source` (its citation) and only the figures its paper gives (the rest None)."""

    label: str
    model: str
    ppl_ratio: float | None  # SNN over the ANN (no prefix)
    ppl_ratio_prefixed: float | None  # SNN over the float model after the same prefix
    costs: dict[str, float | None]  # COSTS -> value
    snn_ppl: float | None = None
    ann_ppl: float | None = None
    prefixed_float_ppl: float | None = None
    energy_per_token_j: dict[str, float] = field(default_factory=dict)  # SNN, per tier (measured points)
    ann_energy_per_token_j: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # coding, T per site, windows, ... (measured points)
    source: str = "measured"

    @property
    def measured(self) -> bool:
        return self.source == "measured"


# Published points (docs/method.md §9): the papers' own models and conventions, for orientation only.
PUBLISHED = (
    FrontierPoint(
        label="SpikingLLM, T=6, 2 grains", model="LLaMA-3-8B",
        ppl_ratio=7.60 / 6.14, ppl_ratio_prefixed=None,
        costs={"acs_per_mac": 11521.88 / 3912.08, "compute": 10.44 / 18.00, "neuron": None, "memory": 48.84 / 56.47},
        source="SpikingLLM (ICLR 2026) §6.3 / App. D.7: PPL 7.60–8.04 vs FP16 6.14 (best shown); 11521.88 G AC vs "
               "3912.08 G MAC; 10.44 J vs 18.00 J compute, 48.84 J vs 56.47 J with read/write; 45 nm constants"),
    FrontierPoint(
        label="SpikingLLM, T=6, masking", model="LLaMA-3-8B",
        ppl_ratio=None, ppl_ratio_prefixed=None,
        costs={"acs_per_mac": None, "compute": None, "neuron": None, "memory": 40.13 / 56.47},
        source="SpikingLLM App. D.7: 40.13 J with masking vs 56.47 J (no perplexity given for it)"),
    FrontierPoint(
        label="SDLLM, D=8, W4 ternary", model="LLaMA-2-7B",
        ppl_ratio=6.40 / 5.47, ppl_ratio_prefixed=None,
        costs={"acs_per_mac": 0.22 * 8, "compute": None, "neuron": None, "memory": None},
        source="SDLLM: PPL 6.40 vs FP16 5.47; firing rate ≈ 0.22 over D = 8 steps, about 1.76 spikes per "
               "activation, read as ACs per MAC; its energy uses another accounting, not drawn"),
)


def measured_point(label: str, sim_file: str | Path, eval_file: str | Path, target: Target) -> FrontierPoint:
    """The point of one model: its sim.json (decoded perplexity and counts, priced on `target`) and its eval
    --json (the ANN and prefixed-float baselines on the same windows). One-line SpikecompileError naming the file
    and what to do when the two were not measured on the same model, text, windows and sequence length."""
    run, meta = load_run(sim_file)
    evaluation = _read_eval(eval_file)
    _check_same_measurement(sim_file, meta, eval_file, evaluation)
    if meta.get("ppl") is None or not math.isfinite(meta["ppl"]):
        raise SpikecompileError(f"{sim_file}: holds no finite perplexity; simulate again with --windows")
    priced = ledger(run, target, meta["attention"])["total"]
    counts = priced["counts"]
    if not counts["ann"]["mac"]:
        raise SpikecompileError(f"{sim_file}: the ANN side counts no MAC; simulate again")
    snn_ppl = float(meta["ppl"])
    return FrontierPoint(
        label=label, model=str(meta.get("source", {}).get("path", "")),
        ppl_ratio=snn_ppl / evaluation["ann_ppl"], ppl_ratio_prefixed=snn_ppl / evaluation["prefixed_float_ppl"],
        costs={"acs_per_mac": counts["snn"]["ac"] / counts["ann"]["mac"],
               **{tier: priced["snn_over_ann"][tier] for tier in TIERS}},
        snn_ppl=snn_ppl, ann_ppl=float(evaluation["ann_ppl"]),
        prefixed_float_ppl=float(evaluation["prefixed_float_ppl"]),
        energy_per_token_j=dict(priced["snn"]["per_token"]), ann_energy_per_token_j=dict(priced["ann"]["per_token"]),
        settings={"coding": meta.get("coding"), "mask_steps": meta.get("mask_steps"), "mode": meta.get("mode"),
                  "text": meta.get("text"), "windows": meta.get("windows"), "seqlen": meta.get("seqlen"),
                  "energy_target": target.name, "model_file": meta["model"]["path"],
                  "model_sha256": meta["model"]["sha256"]})


def _read_eval(path: str | Path) -> dict:
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpikecompileError(f"{path}: no such file; write one with spikecompile eval MODEL --json {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SpikecompileError(f"{path}: not an eval --json file ({type(error).__name__}); "
                                f"write one with spikecompile eval MODEL --json") from None
    for key in ("ann_ppl", "prefixed_float_ppl", "text", "windows", "seqlen"):
        value = payload.get(key) if isinstance(payload, dict) else None
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            raise SpikecompileError(f"{path}: no {key}; write it with spikecompile eval MODEL --json")
    return payload


def _check_same_measurement(sim_file, meta: dict, eval_file, evaluation: dict) -> None:
    """The baselines must be those of the simulated model: the same model file, or the same source model and KV
    prefix (the ANN and the prefixed float model do not depend on the spike sites, so one eval serves every
    conversion of a source with that prefix); and the same text, windows and sequence length."""
    same_model = evaluation.get("model_sha256") == meta["model"]["sha256"]
    same_baselines = ("source" in evaluation and "prefix_token_ids" in meta
                      and evaluation["source"].get("sha256") == meta.get("source", {}).get("sha256")
                      and list(evaluation.get("prefix_token_ids", [])) == list(meta["prefix_token_ids"]))
    if not (same_model or same_baselines):
        raise SpikecompileError(f"{eval_file}: evaluates {evaluation.get('model_file')}, whose source model or KV "
                                f"prefix is not that of {meta['model']['path']} ({sim_file}); evaluate that one")
    for key in ("windows", "seqlen"):
        if meta.get(key) != evaluation[key]:
            raise SpikecompileError(f"{eval_file}: {key} {evaluation[key]}, but {sim_file} simulated "
                                    f"{meta.get(key)}; measure both on the same windows")
    if Path(str(meta.get("text"))).name != Path(str(evaluation["text"])).name:
        raise SpikecompileError(f"{eval_file}: text {evaluation['text']}, but {sim_file} simulated "
                                f"{meta.get('text')}; measure both on the same text")


def pareto(points: list[FrontierPoint], cost: str) -> list[FrontierPoint]:
    """The measured points with a `cost` and a prefixed ratio that no other such point dominates (lower or equal
    on both, lower on one), in order of cost."""
    usable = sorted((point for point in points if point.measured and point.costs.get(cost) is not None
                     and point.ppl_ratio_prefixed is not None),
                    key=lambda point: (point.costs[cost], point.ppl_ratio_prefixed))
    front, best = [], math.inf
    for point in usable:
        if point.ppl_ratio_prefixed < best:
            front.append(point)
            best = point.ppl_ratio_prefixed
    return front


def frontier_document(points: list[FrontierPoint], published: bool = True) -> dict:
    """frontier.json's content: every point, the published ones, and each cost's Pareto set by label."""
    shown = [*points, *(PUBLISHED if published else ())]
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "pareto": {cost: [point.label for point in pareto(points, cost)] for cost in COSTS},
            "points": [asdict(point) for point in shown]}


def markdown(points: list[FrontierPoint], published: bool = True) -> str:
    """The table: one row per point; ● marks a point on the Pareto set of that cost."""
    fronts = {cost: {point.label for point in pareto(points, cost)} for cost in COSTS}

    def cost_cell(point: FrontierPoint, cost: str) -> str:
        value = point.costs.get(cost)
        if value is None:
            return "–"
        return f"{value:.3f}" + (" ●" if point.label in fronts[cost] else "")

    def number(value: float | None, digits: int = 3) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| point | SNN PPL | ratio vs ANN | ratio vs float + prefix | ACs per ANN MAC | SNN/ANN compute | "
             "+ neuron state | + memory | mJ/token (compute / neuron / memory) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for point in sorted(points, key=lambda point: point.costs["acs_per_mac"]):
        energy = " / ".join(f"{point.energy_per_token_j[tier] * 1e3:.3f}" for tier in TIERS)
        lines.append(f"| {point.label} | {number(point.snn_ppl, 2)} | {number(point.ppl_ratio, 4)} | "
                     f"{number(point.ppl_ratio_prefixed, 4)} | "
                     + " | ".join(cost_cell(point, cost) for cost in COSTS) + f" | {energy} |")
    if points:
        first = points[0]
        ann = " / ".join(f"{first.ann_energy_per_token_j[tier] * 1e3:.3f}" for tier in TIERS)
        lines.append(f"| ANN | {number(first.ann_ppl, 2)} | 1 | {number(first.ann_ppl / first.prefixed_float_ppl, 4)}"
                     f" | – | 1 | 1 | 1 | {ann} |")
    if published:
        lines += ["", "Published points (other models and counting conventions; for orientation only):", "",
                  "| point | model | ratio vs its ANN | ACs per MAC | SNN/ANN compute | + memory | source |",
                  "|---|---|---|---|---|---|---|"]
        for point in PUBLISHED:
            lines.append(f"| {point.label} | {point.model} | {number(point.ppl_ratio)} | "
                         f"{number(point.costs['acs_per_mac'])} | {number(point.costs['compute'])} | "
                         f"{number(point.costs['memory'])} | {point.source} |")
    lines += ["", "● on the Pareto set of that cost (against the ratio to the float model with the same prefix)."]
    return "\n".join(lines) + "\n"


RATIO_CAP = 1.3
"""Ratios above this are drawn at it, as ▲ with their value in the label: a coding that loses the model (a ratio
of 1000), or one at twice the ANN's perplexity, would otherwise squeeze the points worth choosing (1.0 to about 1.2,
where the published ones lie too) into one line. The table and frontier.json keep the values."""


def frontier_figure(points: list[FrontierPoint], published: bool = True) -> Figure:
    """One panel per cost: the ratio against the prefixed float model (filled) and against the ANN (hollow),
    the Pareto set joined by a line, published points as labelled stars; ratios above RATIO_CAP at the cap, as ▲.
    Labels never move the panels (out of the layout, clipped to their axes); the ratio axis is logarithmic only
    when the drawn ratios span more than 10×."""
    figure = Figure(figsize=(13, 10), layout="constrained")
    axes = figure.subplots(2, 2).flatten()
    others = [point for point in (PUBLISHED if published else ()) if point.ppl_ratio is not None]

    def drawn(ratio: float) -> float:
        return min(ratio, RATIO_CAP)

    ratios = [drawn(ratio) for point in [*points, *others]
              for ratio in (point.ppl_ratio, point.ppl_ratio_prefixed) if ratio is not None]
    # (the ratio, its marker style, its legend entry, the legend entry of its points above the cap)
    series = ((lambda point: point.ppl_ratio_prefixed, {"color": "tab:blue"}, "SNN / (float + same prefix)",
               f"ratio > {RATIO_CAP:g}, drawn at it (value in its label)"),
              (lambda point: point.ppl_ratio, {"facecolors": "none", "edgecolors": "tab:blue"}, "SNN / ANN (no prefix)",
               None))

    def label(ax, text, x, y, offset=(4, 3), **style):
        note = ax.annotate(text, (x, y), fontsize=7, xytext=offset, textcoords="offset points", clip_on=True,
                           **style)
        note.set_in_layout(False)

    for ax, cost in zip(axes, COSTS):
        shown = [point for point in points if point.costs.get(cost) is not None]
        for ratio_of, style, name, capped_name in series:
            below = [point for point in shown if ratio_of(point) <= RATIO_CAP]
            above = [point for point in shown if ratio_of(point) > RATIO_CAP]
            ax.scatter([point.costs[cost] for point in below], [ratio_of(point) for point in below], zorder=3,
                       label=name, **style)
            if above:
                ax.scatter([point.costs[cost] for point in above], [RATIO_CAP] * len(above), marker="^", zorder=3,
                           label=capped_name, **style)
        off_scale = 0
        for point in sorted(shown, key=lambda point: point.costs[cost]):
            if point.ppl_ratio_prefixed > RATIO_CAP:  # stacked below the cap, so that neighbours do not overlap
                off_scale += 1
                label(ax, f"{point.label}: ratio {point.ppl_ratio_prefixed:.3g}", point.costs[cost], RATIO_CAP,
                      offset=(4, -4 - 9 * off_scale))
            else:
                label(ax, point.label, point.costs[cost], point.ppl_ratio_prefixed)
        front = pareto(points, cost)
        ax.plot([point.costs[cost] for point in front], [drawn(point.ppl_ratio_prefixed) for point in front],
                color="tab:red", linewidth=1.2, zorder=2, label="Pareto set")
        listed = [point for point in others if point.costs.get(cost) is not None]
        ax.scatter([point.costs[cost] for point in listed], [drawn(point.ppl_ratio) for point in listed], marker="*",
                   s=120, color="tab:gray", zorder=3, label="published (other models, vs their ANN)")
        for point in listed:
            label(ax, f"{point.label}, {point.model}", point.costs[cost], drawn(point.ppl_ratio), color="tab:gray")
        if cost != "acs_per_mac":
            ax.axvline(1.0, color="black", linewidth=0.8, linestyle=":", label="SNN energy = ANN energy")
        ax.set_xlabel(COST_LABELS[cost])
        ax.set_ylabel("perplexity ratio")
        if ratios and max(ratios) > 10 * min(ratios):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    axes[1].legend(fontsize=8, loc="best", handles=[line for line in axes[1].get_lines() if line.get_linestyle() == ":"])
    figure.suptitle("Accuracy–energy frontier (WikiText-2 perplexity; ledger per docs/method.md §7)")
    return figure


def write_frontier(points: list[FrontierPoint], folder: Path, published: bool = True) -> dict[str, Path]:
    """frontier.json, frontier.md and frontier.png into `folder` (each written atomically)."""
    if not points:
        raise SpikecompileError("frontier: no measured point; give at least one --point")
    labels = [point.label for point in points]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise SpikecompileError(f"--point {repeated[0]}: the label is given twice; give each point its own label")
    paths = {"json": folder / "frontier.json", "markdown": folder / "frontier.md", "plot": folder / "frontier.png"}
    text = json.dumps(frontier_document(points, published), indent=1) + "\n"
    atomic_write(paths["json"], lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    table = markdown(points, published)
    atomic_write(paths["markdown"], lambda temp: Path(temp).write_text(table, encoding="utf-8"))
    figure = frontier_figure(points, published)
    FigureCanvasAgg(figure)
    atomic_write(paths["plot"], lambda temp: figure.savefig(temp, format="png", dpi=DPI, metadata={"Software": None}))
    return paths

