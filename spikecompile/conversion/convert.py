"""ANN -> spiking model: load, rotate, install sites, calibrate, fit, save model.pt; and load it back."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

import torch

from .. import __version__, modelfile
from ..data import load_text, token_windows
from ..devices import Placement, peak_memory_mb
from ..errors import SpikecompileError
from ..files import check_writable
from ..loading import ModelSource, load_model, resolve_source, verify_source
from ..modelschema import TIMESTEP_RANGE, WEIGHT_BITS, check_prefix_vocabulary
from ..neuron import PhaseNeuronParams
from .calibration import collect_samples
from .codings import CODINGS, SDLLM_COUNT_BITS, SDLLM_SCALES, SIGNED_CODINGS, sdllm_steps
from .budget import BUDGET_KINDS, TIMESTEP_CHOICES, allocate, site_curves, site_fisher
from .fit import FITTED, FitConfig, SiteFit, fit_sites, lloyd_max_mse, spikes_per_activation
from .prefix import PrefixCache, select_prefix
from .rotation import rotate_llama
from .sites import SiteTable, install_sites
from .weights import rtn_quantize_weights

ROTATIONS = ("hadamard", "none")
PREFIXES = ("auto", "none")


@dataclass(frozen=True)
class ConvertOptions:
    """The options of `spikecompile convert`; validate() checks every one of them before anything is loaded."""

    timesteps: int = 8
    grains: int = 2
    coding: str = "phase"
    rotate: str = "hadamard"
    prefix: str = "auto"
    calib: str = "builtin"
    calib_windows: int = 4
    calib_seqlen: int = 512
    samples_per_site: int = 8192
    weight_bits: int | None = None
    membrane_clip: float = 0.0
    seed: int = 0
    sdllm_scales: str = "static"
    spike_penalty: float = 0.0
    energy_budget: float | None = None
    spikes_per_mac: float | None = None
    """A global budget (at most one; conversion/budget.py): each site then runs its own T, chosen under it, and
    `timesteps` is not used."""

    @property
    def budget(self) -> tuple[str, float] | None:
        """(kind, value) of the budget given, or None."""
        if self.energy_budget is not None:
            return "energy", self.energy_budget
        return ("spikes_per_mac", self.spikes_per_mac) if self.spikes_per_mac is not None else None

    def recorded(self) -> dict:
        """The options as model.pt records them: the later options only where given, so a conversion without
        them writes the same model.pt as before they existed."""
        options = asdict(self)
        for name, default in (("sdllm_scales", "static"), ("spike_penalty", 0.0), ("energy_budget", None),
                              ("spikes_per_mac", None)):
            if options[name] == default:
                del options[name]
        return options

    def validate(self) -> None:
        low, high = TIMESTEP_RANGE
        if self.energy_budget is not None and self.spikes_per_mac is not None:
            raise SpikecompileError("--energy-budget and --spikes-per-mac: give one budget, not both")
        for option, value in (("--energy-budget", self.energy_budget), ("--spikes-per-mac", self.spikes_per_mac)):
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise SpikecompileError(f"{option} {value}: must be a number > 0")
            if value is not None and self.grains > TIMESTEP_RANGE[0] // 2:
                raise SpikecompileError(f"{option}: --grains {self.grains} cannot run at T = {TIMESTEP_RANGE[0]}, the "
                                        f"lowest T a budget may choose; use --grains 1 or 2")
            if value is not None and self.coding not in FITTED:
                raise SpikecompileError(f"{option}: per-site budgets fit each site at its own T; use them with "
                                        f"--coding {' or '.join(FITTED)}, not {self.coding}")
        if not (isinstance(self.spike_penalty, int | float) and math.isfinite(self.spike_penalty)
                and self.spike_penalty >= 0):
            raise SpikecompileError(f"--spike-penalty {self.spike_penalty}: must be a number ≥ 0 (0: MSE only)")
        if self.spike_penalty and self.coding not in FITTED:
            raise SpikecompileError(f"--spike-penalty: only the fitted codings ({', '.join(FITTED)}) trade error "
                                    f"for spikes; --coding {self.coding} fits nothing")
        if self.coding not in (*CODINGS, *SIGNED_CODINGS):
            raise SpikecompileError(f"--coding {self.coding!r}: unknown coding; choose one of "
                                    f"{', '.join((*CODINGS, *SIGNED_CODINGS))}")
        if self.coding == "sdllm" and self.timesteps not in [sdllm_steps(bits) for bits in SDLLM_COUNT_BITS]:
            raise SpikecompileError(
                f"--coding sdllm -T {self.timesteps}: sdllm unfolds b-bit counts over T = 2^(b-1) steps; supported "
                + ", ".join(f"-T {sdllm_steps(bits)} ({bits}-bit counts)" for bits in SDLLM_COUNT_BITS))
        if self.weight_bits is not None and self.weight_bits not in WEIGHT_BITS:
            raise SpikecompileError(f"--weight-bits {self.weight_bits}: supported RTN weight widths are "
                                    f"{', '.join(map(str, WEIGHT_BITS))} (or leave the weights in float)")
        if self.membrane_clip and self.coding != "sdllm":
            raise SpikecompileError(f"--membrane-clip is SDLLM's membrane clipping; use it with --coding sdllm, "
                                    f"not {self.coding}")
        if self.sdllm_scales not in SDLLM_SCALES:
            raise SpikecompileError(f"--sdllm-scales {self.sdllm_scales!r}: choose one of {', '.join(SDLLM_SCALES)}")
        if self.sdllm_scales == "per-token" and (self.coding != "sdllm" or self.membrane_clip):
            raise SpikecompileError("--sdllm-scales per-token: SDLLM's run-time min-max scales; use it with --coding "
                                    "sdllm and without --membrane-clip")
        if not 0 <= self.membrane_clip < 1:
            raise SpikecompileError(f"--membrane-clip {self.membrane_clip}: the share of zero counts to reach, in [0, 1)")
        if not low <= self.timesteps <= high:
            raise SpikecompileError(f"--timesteps {self.timesteps}: must be in {low}..{high}")
        if not 1 <= self.grains <= self.timesteps // 2:
            raise SpikecompileError(
                f"--grains {self.grains}: must be in 1..T/2 = 1..{self.timesteps // 2} (each grain spans ≥ 2 steps)"
            )
        if self.rotate not in ROTATIONS:
            raise SpikecompileError(f"--rotate {self.rotate!r}: choose one of {', '.join(ROTATIONS)}")
        if self.prefix not in PREFIXES:
            raise SpikecompileError(f"--prefix {self.prefix!r}: choose one of {', '.join(PREFIXES)}")
        if self.calib_windows < 1:
            raise SpikecompileError(f"--calib-windows {self.calib_windows}: must be at least 1")
        if self.calib_seqlen < 2:  # one window predicts its tokens from the ones before: two at least
            raise SpikecompileError(f"--calib-seqlen {self.calib_seqlen}: must be at least 2")
        if not 0 <= self.seed < 2**32:  # per-site generators are seeded seed·100003 + site: stays in 64 bits
            raise SpikecompileError(f"--seed {self.seed}: must be a whole number in 0..{2**32 - 1}")
        if self.samples_per_site < 64:
            raise SpikecompileError(f"--samples-per-site {self.samples_per_site}: must be at least 64")


@dataclass
class ConversionReport:
    """What one conversion did and how long each stage took (printed by the CLI, written by --json)."""

    output: str
    sites: int
    timings_s: dict = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None
    placement: dict = field(default_factory=lambda: asdict(Placement()))


@dataclass
class SpikingModel:
    """A converted model, ready to run: the transformers model with its sites in `decoded` mode."""

    model: torch.nn.Module
    tokenizer: object
    sites: SiteTable
    record: dict
    prefix: PrefixCache | None = None
    rotations: str = "applied"
    """"applied": the offline rotations are in the weights; "explicit": left out of them (rotate_llama with
    apply=False) for frontend.trace to emit as Rotation nodes, so the model itself cannot run."""

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The spiking model's logits for [1, L] ids (after the KV prefix, if the model has one)."""
        ids = ids.to(self.model.device)  # windows are tokenized on the CPU (a no-op there)
        if self.rotations != "applied":
            raise SpikecompileError("this model was loaded with its rotations left out of the weights, for tracing; "
                                    "run its traced graph (ir.interpret) or load it with rotations='applied'")
        return self.prefix.forward(self.model, ids) if self.prefix else self.model(ids).logits

    def ann_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The float model's logits: every site off, no prefix (the baseline the SNN is measured against)."""
        with self.sites.all_off():
            return self.model(ids.to(self.model.device)).logits

    def prefixed_float_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The float model run as the spiking model runs: every site off, after the same KV prefix (without a
        prefix, the ANN's logits). The stricter baseline: the SNN/this ratio is the conversion's own cost."""
        with self.sites.all_off():
            return self.logits(ids)


def _created_utc() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def convert(model_spec: str | None, output: str, options: ConvertOptions, progress: bool = True,
            placement: Placement = Placement(), cost_model=None) -> ConversionReport:
    """Convert the source model into model.pt. placement: the device and dtype of the float forward (resolved
    by devices.resolve_placement before this); the fit and everything model.pt holds stay fp32 on the CPU.
    cost_model (with a budget only): cost_model(config dict, kind, seq_len, grains) -> an object with `groups`
    (the sites that must share T), `linear()` (a budget.LinearCost) and `measure(timesteps, spikes)`, the ledger's
    (spikecompile.budget.LedgerCost; passed in because the ledger lives in a layer above conversion)."""
    options.validate()
    check_writable(output)
    calib_text = load_text(options.calib, split="calib")
    source = resolve_source(model_spec)
    torch.manual_seed(options.seed)
    timings = {}

    start = time.perf_counter()
    model, tokenizer = load_model(source, placement, progress)
    rotation = rotate_llama(model, seed=options.seed) if options.rotate == "hadamard" else None
    weights = rtn_quantize_weights(model, options.weight_bits) if options.weight_bits else None
    sites = install_sites(model)
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    windows = token_windows(tokenizer, calib_text, options.calib_seqlen, options.calib_windows, "calibration")
    windows = [ids.to(placement.device) for ids in windows]
    prefix = select_prefix(model, tokenizer, windows) if options.prefix == "auto" else None
    kv_prefix = PrefixCache(model, sites, prefix["token_ids"]) if prefix else None
    forward = SpikingModel(model, tokenizer, sites, {}, kv_prefix).logits
    samples = collect_samples(forward, sites, windows, options.samples_per_site, options.seed, progress)
    timings["calibration"] = time.perf_counter() - start

    start = time.perf_counter()
    fit_config = FitConfig(T=options.timesteps, n_grains=options.grains, coding=options.coding,
                           membrane_clip=options.membrane_clip, seed=options.seed, spike_penalty=options.spike_penalty)
    budget = None
    if options.budget:
        if cost_model is None:
            raise SpikecompileError(f"{BUDGET_KINDS[options.budget[0]]}: a budget needs the ledger's cost model; "
                                    f"pass cost_model=spikecompile.budget.LedgerCost")
        forward_fn = SpikingModel(model, tokenizer, sites, {}, kv_prefix).logits
        fisher = site_fisher(forward_fn, sites, model.get_input_embeddings(), windows)
        cost = cost_model(model.config.to_dict(), options.budget[0], options.calib_seqlen, options.grains)
        rows, budget = _fit_under_budget(samples, list(sites), fisher, cost, fit_config, options, progress)
        fit_config = replace(fit_config, T=max(budget["timesteps"].values()))
    else:
        fit = fit_sites(samples, fit_config, progress=progress)
        rows = _fit_rows(fit, samples)
    timings["fitting"] = time.perf_counter() - start

    record = {
        "source": source.to_dict(),
        "rotation": rotation,
        "weights": weights,
        "prefix": prefix,
        "coding": {"name": options.coding, "timesteps": fit_config.T, "grains": rows[0][0].n_grains,
                   **({"scales": "per-token"} if options.sdllm_scales == "per-token" else {})},
        "sites": _site_table(sites, rows, samples),
        "calibration": {
            "source": calib_text.name, "sha256": calib_text.sha256, "windows": len(windows),
            "seqlen": options.calib_seqlen, "samples_per_site": options.samples_per_site,
        },
        "conversion": {
            "spikecompile": __version__, "torch": str(torch.__version__), "transformers": _transformers_version(),
            "seed": options.seed, "fit": _recorded_fit(fit_config), "options": options.recorded(),
            "created_utc": _created_utc(),
        },
    }
    if budget is not None:
        record["budget"] = budget
    if not placement.is_default:  # the default's model.pt is as it was before the option
        record["conversion"]["placement"] = asdict(placement)
    modelfile.save(record, output)
    peaks = peak_memory_mb()
    return ConversionReport(output=str(output), sites=len(sites), timings_s=timings, peak_rss_mb=peaks["peak_rss_mb"],
                            peak_gpu_mb=peaks.get("peak_gpu_mb"), placement=asdict(placement))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _recorded_fit(fit_config: FitConfig) -> dict:
    """The fit's settings as model.pt records them (spike_penalty only where given: see ConvertOptions.recorded)."""
    settings = asdict(fit_config)
    if not settings["spike_penalty"]:
        del settings["spike_penalty"]
    return settings


def _fit_rows(fit: SiteFit, samples: torch.Tensor) -> list[tuple[PhaseNeuronParams, dict]]:
    """Per site: its neuron (batch shape ()) and its calibration record (errors, the Lloyd-Max bound)."""
    levels = 2 ** (fit.params.T + 1) - 1
    bound = lloyd_max_mse(samples, levels)
    rows = []
    for index in range(len(samples)):
        neuron = PhaseNeuronParams(**{name: getattr(fit.params, name)[index] for name in
                                      ("tau", "genotype", "d", "h", "theta", "v0", "max_spikes")},
                                   signed_digits=fit.params.signed_digits)
        rows.append((neuron, {
            "mse": float(fit.mse[index]), "base2_tau": float(fit.base2_tau[index]),
            "base2_mse": float(fit.base2_mse[index]), "lloyd_max_mse": float(bound[index]),
            "lloyd_max_levels": levels, "max_abs": float(fit.max_abs[index])}))
    return rows


def _fit_under_budget(samples, names, fisher, cost, fit_config: FitConfig, options: ConvertOptions,
                      progress: bool, rounds: int = 3) -> tuple[list, dict]:
    """Allocate each site's T under the budget (conversion/budget.py), fit every site at its T, and check the
    fitted spikes on the exact ledger; where they cost more than the base-2 curves said, rescale those curves
    by the fitted/base-2 spikes and allocate again, at most `rounds` times. Returns the rows and the record."""
    kind, value = options.budget
    curves = site_curves(samples, options.grains, signed=options.coding in SIGNED_CODINGS)
    linear = cost.linear()
    timesteps, fitted, rows = None, {}, {}
    for _ in range(rounds):
        try:
            timesteps = allocate(names, cost.groups, curves, fisher, linear, value, start=timesteps)
        except ValueError as floor:
            raise SpikecompileError(f"{BUDGET_KINDS[kind]} {value:g}: infeasible; T = 4 at every site already "
                                    f"costs {floor} (the least this model can cost); give a budget of at least "
                                    f"that") from None
        for steps in sorted(set(timesteps.values())):
            wanted = [index for index, name in enumerate(names) if timesteps[name] == steps and
                      fitted.get(name, (None,))[0] != steps]
            if not wanted:
                continue
            fit = fit_sites(samples[wanted], replace(fit_config, T=steps),
                            progress=progress, names=[names[index] for index in wanted])
            spikes = spikes_per_activation(samples[wanted], fit.params)
            for row, (index, entry) in enumerate(zip(wanted, _fit_rows(fit, samples[wanted]), strict=True)):
                rows[index] = entry
                fitted[names[index]] = (steps, float(spikes[row]))
        measured = cost.measure(timesteps, {name: fitted[name][1] for name in names})
        if measured <= value:
            break
        for index, name in enumerate(names):  # the fitted neuron fires otherwise than the base-2 curve said
            column = TIMESTEP_CHOICES.index(timesteps[name])
            ratio = fitted[name][1] / max(float(curves.spikes[index, column]), 1e-12)
            curves.spikes[index] *= ratio
    record = {"kind": kind, "value": float(value), "seq_len": options.calib_seqlen, "measured": float(measured),
              "target": "cmos45nm" if kind == "energy" else None,
              "timesteps": dict(timesteps), "fisher": {name: float(fisher[index]) for index, name in enumerate(names)},
              "spikes_per_activation": {name: fitted[name][1] for name in names}}
    return [rows[index] for index in range(len(names))], record


def _site_table(sites: SiteTable, rows: list, samples) -> dict:
    table = {}
    for index, name in enumerate(sites):
        layer, kind = _parse_site_name(name)
        params, calibration = rows[index]
        table[name] = {
            "layer": layer, "kind": kind, "timesteps": params.T,
            "genotype": params.genotype.clone(),
            "tau": params.tau.clone(), "d": params.d.clone(),
            "h": params.h.clone(), "theta": params.theta.clone(),
            "v0": params.v0.clone(), "max_spikes": int(params.max_spikes),
            **({"signed_digits": True} if params.signed_digits else {}),
            "calibration": calibration,
            "samples": samples[index].clone(),
        }
    return table


def _parse_site_name(name: str) -> tuple[int | None, str]:
    if name == "final_norm":
        return None, name
    _, layer, kind = name.split(".")
    return int(layer), kind


def site_neuron(entry: dict) -> PhaseNeuronParams:
    """A site's neuron from its model.pt entry (v0 and max_spikes default to the phase neuron's)."""
    budget = entry.get("max_spikes")
    return PhaseNeuronParams(tau=entry["tau"], genotype=entry["genotype"], d=entry["d"], h=entry["h"],
                             theta=entry["theta"], v0=entry.get("v0"),
                             max_spikes=None if budget is None else torch.as_tensor(budget, dtype=torch.int64),
                             signed_digits=bool(entry.get("signed_digits", False)))


def _on_device(neuron: PhaseNeuronParams, device: str) -> PhaseNeuronParams:
    """The neuron's tensors on `device` (the same object on the CPU, where model.pt's tensors are)."""
    if device == "cpu":
        return neuron
    import dataclasses

    moved = {item.name: getattr(neuron, item.name) for item in dataclasses.fields(neuron)}
    return dataclasses.replace(neuron, **{name: value.to(device) if isinstance(value, torch.Tensor) else value
                                          for name, value in moved.items()})


def load_spiking_model(path: str, source_path: str | None = None, rotations: str = "applied",
                       placement: Placement = Placement(), progress: bool = False,
                       record: dict | None = None) -> SpikingModel:
    """Rebuild the spiking model from model.pt: source weights, the same rotation, the fitted sites.

    `source_path` overrides the recorded source location (its bytes must still match the recorded sha256).
    placement: the device and dtype of the rebuilt model's weights (the neurons run in fp32 on its device).
    rotations "explicit" leaves the offline rotations out of the weights (SpikingModel.rotations) — except
    for RTN-quantized weights, which were rounded in the rotated basis and so keep their rotations applied.
    record: model.pt's record, when the caller has already read it with modelfile.load (not read twice).
    """
    if rotations not in ("applied", "explicit"):
        raise ValueError(f"rotations must be 'applied' or 'explicit', got {rotations!r}")
    if record is None:
        record = modelfile.load(path)  # checked against the model.pt schema: types, ranges, consistency
    if record.get("weights"):
        rotations = "applied"
    source = ModelSource(**record["source"])
    if source_path is not None:
        source = ModelSource(source.kind if source.kind != "embedded" else "gguf", source_path, source.sha256)
    verify_source(source, where=str(path))
    model, tokenizer = load_model(source, placement, progress)
    check_prefix_vocabulary(record, model.get_input_embeddings().num_embeddings, str(path), source.path)
    rotation = record["rotation"]
    if rotation is not None and rotate_llama(model, seed=rotation["seed"], apply=rotations == "applied") != rotation:
        raise SpikecompileError(f"{path}: re-applying the recorded rotation gave a different record; re-convert")
    weights = record.get("weights")
    if weights and rtn_quantize_weights(model, weights["bits"]) != weights:
        raise SpikecompileError(f"{path}: re-applying the recorded weight quantization gave a different record; "
                                f"re-convert")
    sites = install_sites(model)
    if list(sites) != list(record["sites"]):
        raise SpikecompileError(f"{path}: its spike-site table does not match the model's layers; re-convert")
    for name, site in sites.items():
        try:
            site.neuron = _on_device(site_neuron(record["sites"][name]), placement.device)
        except (KeyError, ValueError, TypeError) as error:
            raise SpikecompileError(f"{path}: site {name} has an invalid neuron ({error})") from None
    if record["coding"].get("scales") == "per-token":
        for site in sites.values():
            site.per_token_steps = record["coding"]["timesteps"]
    prefix = PrefixCache(model, sites, record["prefix"]["token_ids"]) if record["prefix"] else None
    sites.set_mode("decoded")
    return SpikingModel(model, tokenizer, sites, record, prefix, rotations if rotation is not None else "applied")
