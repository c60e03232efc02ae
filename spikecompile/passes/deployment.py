"""The deployment report of a graph on Loihi 2: every value's format (passes.loihi_mapping.deployed_formats), each
synapse's worst-case accumulator headroom, what saturates on calibration data and how often, and the fixed-point
perplexity on a text (`build --target lava`, `build --target sim --numerics loihi2`, `inspect --formats loihi2`).

    formats_report(graph, formats)            per synapse, site and op: its format; per synapse its headroom
    sample_saturation(graph, formats, samples) per site: potentials beyond the state on its stored samples
    CalibrationRun                            run_fixed over token windows: saturations, overflows, perplexity
    fit_payload_grids(graph, store, target, windows)  per site, the payload grid its synapses' accumulators hold
    calibration_text(record)                  the text model.pt was calibrated on, when it can still be read
    check_overflow(overflow, allow)           an accumulator that overflows on calibration data: one-line error

The accumulator of a synapse row holds its window sum Σ_t A_t (the neuron's `acc`, rounded once by the gain): its
worst case is 2·Σ_j|m_ij| times the largest code a source neuron sends, Σ of its K largest payloads D_t (K its
spike budget, else T). Headroom = log2(2^(b−1) − 1) − log2(worst case), in bits; below 0 the worst case overflows
but calibration data may not (that is what the calibration run counts).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping

import numpy as np
import torch

from ..data import BUILTIN, TextSource, load_text, token_windows
from ..errors import SpikecompileError
from ..hardware.loihi2 import (
    OP_FORMAT, PAYLOAD_FRACTION_BITS, Loihi2, SiteFormat, SynapseFormat, accumulator_peak, gain, window_peak,
)
from ..ir import Graph, Input, PhaseNeuron
from .fixed_point import run_fixed
from .loihi_mapping import Formats, deployed_formats


def code_peak(site: SiteFormat) -> int:
    """The largest |c| = Σ_t D_t·s_t one neuron of the site can send: its K largest payloads (K = T unbudgeted)."""
    spikes = site.max_spikes or len(site.payload)
    return int(np.sort(site.payload)[::-1][:spikes].sum())


def synapse_entry(synapse: SynapseFormat, source: SiteFormat) -> dict:
    """One synapse's format and worst-case accumulator figures (module docstring)."""
    limit = 2 ** (synapse.accumulator_bits - 1) - 1
    window = accumulator_peak(synapse.mantissa) * code_peak(source)
    return {"shape": list(synapse.mantissa.shape), "weight_bits": synapse.weight_bits, "layout": synapse.layout,
            "row_scales": int(synapse.scale.size), "accumulator_bits": synapse.accumulator_bits,
            "accumulator_limit": limit, "step_peak": window_peak(synapse, source), "window_peak": window,
            "headroom_bits": math.log2(limit) - math.log2(window) if window else None,
            "source_site": source.site}


def site_entry(site: SiteFormat) -> dict:
    """One site's neuron format: its state, grid, thresholds/resets and payload."""
    return {"state_bits": site.state_bits, "fraction_bits": site.exponent, "unit": site.unit,
            "threshold_range": [int(site.threshold.min()), int(site.threshold.max())],
            "reset_range": [int(site.reset.min()), int(site.reset.max())],
            "payload_bits": site.payload_bits, "payload": site.payload.tolist(), "delta": site.delta,
            "max_spikes": site.max_spikes}


def formats_report(graph: Graph, formats: Formats) -> dict:
    """Every value's deployed format: synapses and sites by node name, the ops by IR type (each with its nodes)."""
    ops: dict[str, list[str]] = {}
    for name in graph.topological_order():
        if name not in formats.sites and name not in formats.synapses and not isinstance(graph[name], Input):
            ops.setdefault(type(graph[name]).__name__, []).append(name)
    return {"synapses": {name: synapse_entry(synapse, formats.sites[formats.sources[name]])
                         for name, synapse in formats.synapses.items()},
            "sites": {formats.sites[name].site: {"node": name, **site_entry(site)}
                      for name, site in formats.sites.items()},
            "ops": {kind: {"nodes": len(names), "where": OP_FORMAT["where"], "format": OP_FORMAT["format"]}
                    for kind, names in ops.items()},
            "op_source": OP_FORMAT["source"]}


def sample_saturation(graph: Graph, formats: Formats, samples: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """{site: {saturated, samples}}: the site's neuron run on its stored calibration samples (its input x, rounded
    onto its grid with the gain an op message gets) and the potentials beyond ±(2^(s−1) − 1)."""
    found = {}
    for name, site in formats.sites.items():
        if site.site in samples and isinstance(graph[name], PhaseNeuron):
            values = samples[site.site].double()
            potentials = torch.round(values * float(gain(1.0 / site.unit)))
            found[site.site] = {"saturated": int((potentials.abs() > site.limit).sum()), "samples": values.numel()}
    return found


class CalibrationRun:
    """run_fixed over token windows, tallying per site the potentials that saturate and per synapse the window sums
    that overflow its accumulator (each of all it computed), and the perplexity of the run's logits."""

    def __init__(self, graph: Graph, store, formats: Formats):
        self.graph, self.store, self.formats = graph, store, formats
        self.saturated: Counter[str] = Counter()
        self.potentials: Counter[str] = Counter()
        self.overflowed: Counter[str] = Counter()
        self.sums: Counter[str] = Counter()
        self.peak: dict[str, int] = {}

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """The fixed-point logits of `ids` (a forward for evaluation.perplexity), tallied."""
        run = run_fixed(self.graph, self.store, ids, self.formats, records=False)
        for name, count in run.saturated.items():
            self.saturated[name] += count
        for name, size in run.sizes.items():
            if name in self.formats.synapses:
                self.overflowed[name] += run.overflowed[name]
                self.sums[name] += size
                self.peak[name] = max(self.peak.get(name, 0), run.peaks[name])
            else:
                self.potentials[self.formats.sites[name].site] += size
        return run.output(self.graph)

    def report(self, only: Callable[[str], bool] = lambda name: True) -> dict:
        """{sites: {site: {saturated, potentials}}, synapses: {name: {overflowed, sums, peak}}} of the nodes `only`
        keeps (a part's sites by site name, its synapses by node name)."""
        return {"sites": {site: {"saturated": self.saturated[site], "potentials": count}
                          for site, count in self.potentials.items() if only(site)},
                "synapses": {name: {"overflowed": self.overflowed[name], "sums": count, "peak": self.peak[name],
                                    "limit": 2 ** (self.formats.synapses[name].accumulator_bits - 1) - 1}
                             for name, count in self.sums.items() if only(name)}}


def check_overflow(synapses: Mapping[str, dict], allow: bool, data: str) -> None:
    """A one-line SpikecompileError naming the first synapse matrix whose accumulator overflows on `data`, unless
    `allow` (--allow-saturation)."""
    over = {name: entry for name, entry in synapses.items() if entry["overflowed"]}
    if over and not allow:
        name, entry = next(iter(over.items()))
        more = f" (and {len(over) - 1} more matrices)" if len(over) > 1 else ""
        raise SpikecompileError(
            f"matrix {name}: its {entry['limit'].bit_length() + 1}-bit accumulator overflows on {entry['overflowed']} "
            f"of {entry['sums']} window sums of {data} (peak {entry['peak']} > {entry['limit']}){more}; lower the "
            f"weight bits or T, or give --allow-saturation to build anyway (the overflows are then reported)")


def saturation_lines(calibration: dict, data: str) -> list[str]:
    """What saturated or overflowed on `data`, and how often (one line each kind; 'none' where nothing did)."""
    sites = {site: entry for site, entry in calibration["sites"].items() if entry["saturated"]}
    synapses = {name: entry for name, entry in calibration.get("synapses", {}).items() if entry["overflowed"]}
    lines = [f"on {data}: potential saturations " + (", ".join(
        f"{site} {entry['saturated']}/{entry['potentials']}" for site, entry in sites.items()) or "none")]
    if "synapses" in calibration:
        lines.append(f"on {data}: accumulator overflows " + (", ".join(
            f"{name} {entry['overflowed']}/{entry['sums']} (peak {entry['peak']} > {entry['limit']})"
            for name, entry in synapses.items()) or "none"))
    return lines


def format_lines(report: dict) -> list[str]:
    """The formats and headroom as text: one line per synapse, site and op type."""
    lines = ["Loihi 2 deployed formats (hardware/loihi2.py):"]
    for name, entry in report["synapses"].items():
        rows, columns = entry["shape"]
        lines.append(f"  synapse {name} [{rows}x{columns}]: {entry['weight_bits']}-bit mantissa, {entry['row_scales']} "
                     f"row scales in the receiver's gain; {entry['accumulator_bits']}-bit accumulator, worst case "
                     f"{entry['window_peak']} per window ({entry['step_peak']} per step) of {entry['accumulator_limit']}:"
                     f" headroom {_headroom(entry):+.1f} bits")
    for site, entry in report["sites"].items():
        budget = f", budget K = {entry['max_spikes']}" if entry["max_spikes"] else ""
        lines.append(f"  site {site}: {entry['state_bits']}-bit potential on τ·2^-{entry['fraction_bits']}, "
                     f"thresholds {entry['threshold_range'][0]}..{entry['threshold_range'][1]}, resets "
                     f"{entry['reset_range'][0]}..{entry['reset_range'][1]}; payload {entry['payload_bits']}-bit, "
                     f"levels {max(entry['payload'])}..{min(entry['payload'])} × {entry['delta']:.4g}{budget}")
    for kind, entry in report["ops"].items():
        lines.append(f"  op {kind} ({entry['nodes']} nodes): {entry['where']}, {entry['format']}")
    return lines


def deployment_lines(report: dict) -> list[str]:
    """The whole deployment report as text: formats and headroom, saturations on the stored samples and on the
    calibration run, and the perplexity where measured."""
    lines = format_lines(report["formats"])
    samples = report.get("sample_saturation", {})
    if samples:
        lines += saturation_lines({"sites": {site: {"saturated": entry["saturated"], "potentials": entry["samples"]}
                                             for site, entry in samples.items()}}, "the stored calibration samples")
    calibration = report.get("calibration")
    if calibration and calibration["checked"]:
        lines += saturation_lines(calibration, calibration["data"])
    elif calibration:
        lines.append(f"accumulator overflows on calibration data: not checked ({calibration['why']})")
    if "perplexity" in report:
        entry = report["perplexity"]
        lines.append(f"fixed-point perplexity ({entry['model']}): {entry['ppl']:.4f} on {entry['text']} "
                     f"({entry['windows']} x {entry['seqlen']} tokens)")
    return lines


def summary_lines(report: dict) -> list[str]:
    """deployment_lines in short, for a terminal: the formats in one line each kind, the least headroom, then the
    saturations and perplexity (the program's README.md holds every synapse and site)."""
    formats = report["formats"]
    synapses, sites = formats["synapses"], formats["sites"]
    lines = []
    if synapses:
        name, least = min(synapses.items(), key=lambda item: _headroom(item[1]))
        bits = sorted({entry["weight_bits"] for entry in synapses.values()})
        lines.append(f"Loihi 2 formats: {len(synapses)} synapse matrices ({'/'.join(map(str, bits))}-bit mantissas, "
                     f"row scales; {least['accumulator_bits']}-bit accumulators), least worst-case headroom "
                     f"{_headroom(least):+.1f} bits ({name})")
    if sites:
        fractions = sorted(entry["fraction_bits"] for entry in sites.values())
        lines.append(f"  {len(sites)} sites: {next(iter(sites.values()))['state_bits']}-bit potentials on τ·2^-F, "
                     f"F = {fractions[0]}..{fractions[-1]}; graded payloads up to "
                     f"{max(max(entry['payload']) for entry in sites.values())}; ops: "
                     f"{sum(entry['nodes'] for entry in formats['ops'].values())} on the host CPU in float64")
    return lines + deployment_lines(report)[1 + len(synapses) + len(sites) + len(formats["ops"]):]


def _headroom(entry: dict) -> float:
    """A synapse's headroom in bits (an all-zero matrix: infinite)."""
    return math.inf if entry["headroom_bits"] is None else entry["headroom_bits"]


HEADROOM_BITS = 1
"""Bits of accumulator range kept free above the largest window sum seen on calibration data (unseen text may
reach further): fit_payload_grids keeps every peak ≤ 2^(b−1−1)."""


def fit_payload_grids(graph: Graph, store, target: Loihi2 | None, windows) -> dict[str, int]:
    """Per site node, the payload fraction bits k (hardware.loihi2.payload_grid) that keep the window sums of every
    synapse it feeds within its accumulator, HEADROOM_BITS to spare, on `windows` (calibration token windows).

    Runs the fixed-point model at k = PAYLOAD_FRACTION_BITS; one bit less halves a site's payloads D_t and so its
    synapses' window sums, so a synapse whose peak is p over the allowed P takes ⌈log2(p/P)⌉ bits off its source
    (sites whose grid is exact at fewer bits are unchanged). Runs again with the new grids (downstream values move a
    little) until nothing is over, at most 3 rounds; the caller's calibration run then reports what remains."""
    chosen: dict[str, int] = {}
    for _ in range(3):
        before = dict(chosen)
        formats = deployed_formats(graph, store, target, chosen)
        run = CalibrationRun(graph, store, formats)
        for window in windows:
            run(window[None] if window.dim() == 1 else window)
        over = False
        for name, peak in run.peak.items():
            allowed = 2 ** (formats.synapses[name].accumulator_bits - 1 - HEADROOM_BITS)
            if peak > allowed:
                source = formats.sources[name]
                bits = before.get(source, PAYLOAD_FRACTION_BITS) - math.ceil(math.log2(peak / allowed))
                chosen[source], over = max(0, min(chosen.get(source, PAYLOAD_FRACTION_BITS), bits)), True
        if not over:
            break
    return chosen


FIT_WINDOWS = 2
"""Calibration windows fit_payload_grids runs on (of the model's calibration text and length)."""


def fitted_fraction_bits(graph: Graph, store, target: Loihi2 | None, record: dict, tokenizer) -> dict | None:
    """fit_payload_grids on FIT_WINDOWS windows of the model's calibration text; None when that text cannot be read
    (the grids then stay at PAYLOAD_FRACTION_BITS, and the deployment report says so)."""
    text = calibration_text(record)
    if text is None:
        return None
    windows = token_windows(tokenizer, text, record["calibration"]["seqlen"], FIT_WINDOWS, "calibration")
    return fit_payload_grids(graph, store, target, windows)


def payload_grids_entry(formats: Formats, fraction_bits: dict | None) -> dict:
    """The deployment report's line on the payload grids: fitted or not, and the sites given fewer fraction bits."""
    if fraction_bits is None:
        return {"fitted": False, "fraction_bits": PAYLOAD_FRACTION_BITS,
                "why": "the calibration text cannot be read: every site keeps the most fraction bits"}
    lowered = {formats.sites[name].site: bits for name, bits in fraction_bits.items() if name in formats.sites}
    return {"fitted": True, "fraction_bits": PAYLOAD_FRACTION_BITS, "windows": FIT_WINDOWS,
            "headroom_bits": HEADROOM_BITS, "lowered": lowered}


def calibration_text(record: dict) -> TextSource | None:
    """The text model.pt was calibrated on, when it can still be read unchanged (its sha256); else None."""
    name = record["calibration"]["source"]
    try:
        text = load_text(BUILTIN, name.split(":", 1)[1]) if name.startswith(f"{BUILTIN}:") else load_text(name, "calib")
    except SpikecompileError:
        return None
    return text if text.sha256 == record["calibration"]["sha256"] else None
