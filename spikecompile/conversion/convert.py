"""ANN -> spiking model: load, rotate, install sites, calibrate, fit, save model.pt; and load it back."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
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
from .fit import FitConfig, fit_sites, lloyd_max_mse
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

    def validate(self) -> None:
        low, high = TIMESTEP_RANGE
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
            placement: Placement = Placement()) -> ConversionReport:
    """Convert the source model into model.pt. placement: the device and dtype of the float forward (resolved
    by devices.resolve_placement before this); the fit and everything model.pt holds stay fp32 on the CPU."""
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
                           membrane_clip=options.membrane_clip, seed=options.seed)
    fit = fit_sites(samples, fit_config, progress=progress)
    levels = 2 ** (options.timesteps + 1) - 1
    bound = lloyd_max_mse(samples, levels)
    timings["fitting"] = time.perf_counter() - start

    record = {
        "source": source.to_dict(),
        "rotation": rotation,
        "weights": weights,
        "prefix": prefix,
        "coding": {"name": options.coding, "timesteps": options.timesteps, "grains": fit.params.n_grains,
                   **({"scales": "per-token"} if options.sdllm_scales == "per-token" else {})},
        "sites": _site_table(sites, fit, bound, levels, samples),
        "calibration": {
            "source": calib_text.name, "sha256": calib_text.sha256, "windows": len(windows),
            "seqlen": options.calib_seqlen, "samples_per_site": options.samples_per_site,
        },
        "conversion": {
            "spikecompile": __version__, "torch": str(torch.__version__), "transformers": _transformers_version(),
            "seed": options.seed, "fit": asdict(fit_config), "options": asdict(options),
            "created_utc": _created_utc(),
        },
    }
    if not placement.is_default:  # the default's model.pt is as it was before the option
        record["conversion"]["placement"] = asdict(placement)
    modelfile.save(record, output)
    peaks = peak_memory_mb()
    return ConversionReport(output=str(output), sites=len(sites), timings_s=timings, peak_rss_mb=peaks["peak_rss_mb"],
                            peak_gpu_mb=peaks.get("peak_gpu_mb"), placement=asdict(placement))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _site_table(sites: SiteTable, fit, bound, levels, samples) -> dict:
    table = {}
    params = fit.params
    for index, name in enumerate(sites):
        layer, kind = _parse_site_name(name)
        table[name] = {
            "layer": layer, "kind": kind, "timesteps": params.T,
            "genotype": params.genotype[index].clone(),
            "tau": params.tau[index].clone(), "d": params.d[index].clone(),
            "h": params.h[index].clone(), "theta": params.theta[index].clone(),
            "v0": params.v0[index].clone(), "max_spikes": int(params.max_spikes[index]),
            **({"signed_digits": True} if params.signed_digits else {}),
            "calibration": {
                "mse": float(fit.mse[index]), "base2_tau": float(fit.base2_tau[index]),
                "base2_mse": float(fit.base2_mse[index]), "lloyd_max_mse": float(bound[index]),
                "lloyd_max_levels": levels, "max_abs": float(fit.max_abs[index]),
            },
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
