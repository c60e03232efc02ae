"""ANN -> spiking model: load, rotate, install sites, calibrate, fit, save model.pt; and load it back."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from .. import __version__, modelfile
from ..data import load_text, token_windows
from ..devices import Placement, peak_memory_mb
from ..errors import SpikecompileError
from ..files import check_writable
from ..loading import ModelSource, load_model, open_layered, resolve_source, verify_source
from ..modelschema import TIMESTEP_RANGE, WEIGHT_BITS, check_prefix_vocabulary
from ..neuron import PhaseNeuronParams
from .checkpoint import Checkpoint
from .codings import CODINGS, SDLLM_COUNT_BITS, SIGNED_CODINGS, sdllm_steps
from .fit import FitConfig, fit_sites, lloyd_max_mse
from .prefix import OUTLIER_ETA, PrefixCache, anchor_candidates, outlier_mask, prefix_record, probe_windows
from .rotation import ResidualRotation, rotate_llama
from .sites import SampleRecorder, SiteTable, SpikeSite, install_layer_sites, install_sites, site_name
from .stream import LayerStream
from .weights import rtn_quantize_layer, rtn_quantize_weights, rtn_record

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
    layers: int = 0
    layer_s: list = field(default_factory=list)
    """seconds per calibrated decoder layer (build, rotate, run every window, checkpoint), in this run"""


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


def _created_utc() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def convert(model_spec: str | None, output: str, options: ConvertOptions, progress: bool = True,
            placement: Placement = Placement(), resume: bool = False,
            on_layer: Callable[[int], None] | None = None) -> ConversionReport:
    """Convert the source model into model.pt, one decoder layer at a time (docs: "layer-sequential conversion").

    placement: the device and dtype of the float forward (resolved by devices.resolve_placement before this); the
    fit and everything model.pt holds stay fp32 on the CPU. A checkpoint beside the output (checkpoint.Checkpoint)
    is written after each calibrated layer; resume continues from it (refused, before any weight is read, when it
    was made with other options). on_layer(index): called after layer `index` is calibrated and checkpointed.
    """
    options.validate()
    check_writable(output)
    calib_text = load_text(options.calib, split="calib")
    source = resolve_source(model_spec)
    checkpoint = Checkpoint(output)
    manifest = {"options": asdict(options), "placement": asdict(placement), "source": source.path,
                "source_sha256": source.sha256, "calibration_sha256": calib_text.sha256, "spikecompile": __version__}
    resumed = checkpoint.resume(manifest) if resume else None  # refused here: before any weight is read
    torch.manual_seed(options.seed)
    timings = {}
    try:
        calibrated, prefix, windows, layers = _stream(source, calib_text, options, placement, checkpoint, manifest,
                                                      resumed, timings, progress, on_layer)
    except SpikecompileError:  # a user error: this checkpoint cannot be resumed into anything else
        checkpoint.remove()
        raise

    start = time.perf_counter()
    samples = calibrated.samples
    fit_config = FitConfig(T=options.timesteps, n_grains=options.grains, coding=options.coding,
                           membrane_clip=options.membrane_clip, seed=options.seed)
    fit = fit_sites(samples, fit_config, progress=progress)
    levels = 2 ** (options.timesteps + 1) - 1
    bound = lloyd_max_mse(samples, levels)
    timings["fitting"] = time.perf_counter() - start

    record = {
        "source": source.to_dict(),
        "rotation": _canonical(calibrated.rotation),
        "weights": rtn_record(options.weight_bits, layers) if options.weight_bits else None,
        "prefix": _canonical(prefix),
        "coding": {"name": options.coding, "timesteps": options.timesteps, "grains": fit.params.n_grains},
        "sites": _site_table(calibrated.names, fit, bound, levels, samples),
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
    checkpoint.remove()
    peaks = peak_memory_mb()
    return ConversionReport(output=str(output), sites=len(calibrated.names), timings_s=timings,
                            peak_rss_mb=peaks["peak_rss_mb"], peak_gpu_mb=peaks.get("peak_gpu_mb"),
                            placement=asdict(placement), layers=layers, layer_s=calibrated.layer_s)


def _canonical(document):
    """A JSON-like record rebuilt from its JSON text: the same values whether it was made in this run or read back
    from the checkpoint, and the same bytes in model.pt (pickle writes a string shared by two places once)."""
    return json.loads(json.dumps(document))


def _stream(source, calib_text, options: ConvertOptions, placement: Placement, checkpoint: Checkpoint,
            manifest: dict, resumed, timings: dict, progress: bool, on_layer):
    """Open the source, check its tensors, start the checkpoint (or go on from `resumed`), select the prefix and
    calibrate, layer by layer; returns (Calibrated, the prefix record, the windows, the layer count)."""
    start = time.perf_counter()
    with open_layered(source, progress) as layered:
        stream = LayerStream(layered, placement)
        layered.weights.check_names(stream.tensor_names(), EMBEDDING_ALIAS, source.path)
        windows = token_windows(layered.tokenizer, calib_text, options.calib_seqlen, options.calib_windows,
                                "calibration")
        windows = [ids.to(placement.device) for ids in windows]
        resumed = resumed or checkpoint.start(manifest)
        timings["load"] = time.perf_counter() - start

        start = time.perf_counter()
        prefix = resumed.prefix
        if not resumed.prefix_known:
            prefix = select_prefix_streamed(stream, layered.tokenizer, windows, options, progress) \
                if options.prefix == "auto" else None
            checkpoint.save_prefix(prefix)
        timings["prefix"] = time.perf_counter() - start

        start = time.perf_counter()
        calibrated = calibrate_streamed(stream, windows, prefix, options, checkpoint, resumed.state, progress,
                                        on_layer)
        timings["calibration"] = time.perf_counter() - start
    return calibrated, prefix, windows, stream.layers


EMBEDDING_ALIAS = {"model.embed_tokens.weight": "lm_head.weight"}
"""A tied embedding may be stored once, under lm_head's name (safetensors' save_model keeps one of tied tensors)."""


def _new_rotation(stream: LayerStream, options: ConvertOptions) -> ResidualRotation | None:
    if options.rotate != "hadamard":
        return None
    head_dim = stream.skeleton.model.layers[0].self_attn.head_dim
    return ResidualRotation(stream.config.hidden_size, head_dim, options.seed, untied=stream.tied)


def _prepared_layer(stream: LayerStream, index: int, rotation: ResidualRotation | None,
                    options: ConvertOptions) -> tuple[torch.nn.Module, SiteTable]:
    """Decoder layer `index` as the converted model has it: rotated, its weights RTN-quantized, its spike sites
    installed (off: the float layer)."""
    layer = stream.layer(index)
    if rotation is not None:
        rotation.rotate_layer(layer, f"model.layers.{index}")
    if options.weight_bits:
        rtn_quantize_layer(layer, options.weight_bits)
    return layer, install_layer_sites(layer, index)


def _embedding(stream: LayerStream, rotation: ResidualRotation | None) -> torch.nn.Embedding:
    """The (rotated) embedding."""
    embedding = stream.embedding()
    if rotation is not None:
        rotation.rotate_embedding(embedding, "model.embed_tokens")
    return embedding


def _final_norm(stream: LayerStream, rotation: ResidualRotation | None, head) -> torch.nn.Module:
    norm = stream.norm()
    if rotation is not None:
        rotation.rotate_head(norm, head, "model.norm", "lm_head")
    return norm


def select_prefix_streamed(stream: LayerStream, tokenizer, windows: list[torch.Tensor], options: ConvertOptions,
                           progress: bool) -> dict:
    """prefix.select_prefix, one layer at a time: every scan (the probe windows alone, and after each anchor) goes
    through each layer before the next is built; the final norm and lm_head give their NLL at the end."""
    probe, anchors = probe_windows(windows), anchor_candidates(tokenizer)
    rotation = _new_rotation(stream, options)
    embedding = _embedding(stream, rotation)
    device = stream.placement.device
    with torch.inference_mode():
        scans = {None: [stream.start(ids, embedding(ids), use_cache=False) for ids in probe]}
        prefixes = {}
        for anchor in anchors:
            anchor_ids = torch.tensor([[anchor]], device=device)
            prefixes[anchor] = stream.start(anchor_ids, embedding(anchor_ids), is_prefix=True)
            scans[anchor] = [stream.start(ids, embedding(ids), prefix=prefixes[anchor]) for ids in probe]
    del embedding
    peaks = {id(sequence): [] for sequences in scans.values() for sequence in sequences}
    for index in tqdm(range(stream.layers), desc="prefix scan", unit="layer", disable=not progress):
        layer, _ = _prepared_layer(stream, index, rotation, options)
        running = []
        layer.mlp.down_proj.register_forward_pre_hook(  # after the online Hadamard: it sees x·H_i
            lambda module, inputs: running[0].append(inputs[0].detach().abs().amax(-1).flatten()))
        for anchor, sequences in scans.items():
            if anchor is not None:
                running[:] = [[]]
                stream.run(layer, prefixes[anchor])
            for sequence in sequences:
                running[:] = [peaks[id(sequence)]]
                stream.run(layer, sequence)
        del layer
    head = stream.lm_head()  # built last: a tied one is a copy of the embedding before its rotation
    norm = _final_norm(stream, rotation, head)
    results = {}
    with torch.inference_mode():
        for anchor, sequences in scans.items():
            masks, nll = [], 0.0
            for sequence in sequences:
                logits = head(norm(sequence.hidden))
                nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], sequence.ids[0, 1:]))
                masks.append(outlier_mask(peaks[id(sequence)], OUTLIER_ETA))
            results[anchor] = (masks, nll / len(sequences))
    return prefix_record(tokenizer, probe, results)


@dataclass
class Calibrated:
    """The streamed calibration's result: site names and samples [S, N] in model order, the rotation record, and
    the seconds each layer took (this run's layers only, when resumed)."""

    names: list[str]
    samples: torch.Tensor
    rotation: dict | None
    layer_s: list[float]


def calibrate_streamed(stream: LayerStream, windows: list[torch.Tensor], prefix: dict | None,
                       options: ConvertOptions, checkpoint: Checkpoint, state: dict | None, progress: bool,
                       on_layer: Callable[[int], None] | None = None) -> Calibrated:
    """calibration.collect_samples, one layer at a time: the prefix and every window go through a layer (its sites
    recording the windows), its samples are kept, the state is checkpointed, and the layer is freed.

    Each site's recorder is seeded seed·100003 + its index in the model's site table and draws
    ceil(N / windows) values per window, as collect_samples does on the whole model."""
    per_call = math.ceil(options.samples_per_site / len(windows))
    rotation = _new_rotation(stream, options)
    if state is None:
        embedding = _embedding(stream, rotation)
        with torch.inference_mode():
            hidden_prefix = embedding(torch.tensor([prefix["token_ids"]], device=stream.placement.device)) \
                if prefix else None
            hidden_windows = [embedding(ids) for ids in windows]
        del embedding
        first, names, chunks = 0, [], []
    else:  # the checkpoint's layers are done: their samples, the rotation record so far, the hidden states after
        first, names, chunks = state["after_layer"] + 1, state["names"], [state["samples"]]
        hidden_prefix, hidden_windows = state["prefix"], state["windows"]
        if rotation is not None:
            rotation.record = state["rotation"]
    prefix_sequence = stream.start(torch.tensor([prefix["token_ids"]]), hidden_prefix, is_prefix=True) \
        if prefix else None
    use_cache = bool(getattr(stream.config, "use_cache", True)) or prefix_sequence is not None
    sequences = [stream.start(ids, hidden, prefix=prefix_sequence, use_cache=use_cache)
                 for ids, hidden in zip(windows, hidden_windows, strict=True)]
    layer_s = []
    for index in tqdm(range(first, stream.layers), desc="calibrate", unit="layer", disable=not progress,
                      initial=first, total=stream.layers):
        began = time.perf_counter()
        layer, sites = _prepared_layer(stream, index, rotation, options)
        chunks.append(_recorded(sites, per_call, options, len(names), stream, prefix_sequence, sequences, layer))
        names += list(sites)
        del layer, sites
        checkpoint.save_state({
            "after_layer": index, "names": names, "samples": torch.cat(chunks), "rotation": rotation and rotation.record,
            "prefix": prefix_sequence.hidden.cpu() if prefix_sequence else None,
            "windows": [sequence.hidden.cpu() for sequence in sequences]})
        chunks = [torch.cat(chunks)]
        layer_s.append(time.perf_counter() - began)
        if on_layer is not None:
            on_layer(index)
    norm = _final_norm(stream, rotation, None)
    final = SiteTable({"final_norm": SpikeSite(site_name(None, "final_norm"))})
    norm.register_forward_hook(lambda module, inputs, output: final["final_norm"](output))
    chunks.append(_recorded(final, per_call, options, len(names), stream, None, sequences, norm))
    return Calibrated([*names, "final_norm"], torch.cat(chunks), rotation and rotation.record, layer_s)


def _recorded(sites: SiteTable, per_call: int, options: ConvertOptions, first_index: int, stream: LayerStream,
              prefix_sequence, sequences, module) -> torch.Tensor:
    """Run the prefix (sites off) and the windows (sites recording) through `module` (a decoder layer, or the
    final norm: then the windows' hidden states stay); return the sites' samples [sites, N]."""
    for offset, site in enumerate(sites.values()):
        site.recorder = SampleRecorder(per_call, seed=options.seed * 100_003 + first_index + offset)
    is_layer = module is not None and hasattr(module, "self_attn")
    if prefix_sequence is not None and is_layer:
        stream.run(module, prefix_sequence)
    sites.set_mode("calibrate")
    try:
        with torch.inference_mode():
            for sequence in sequences:
                if is_layer:
                    stream.run(module, sequence)
                else:
                    module(sequence.hidden)
    finally:
        sites.set_mode("off")
    return torch.stack([site.recorder.samples()[:options.samples_per_site] for site in sites.values()])


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
    prefix = PrefixCache(model, sites, record["prefix"]["token_ids"]) if record["prefix"] else None
    sites.set_mode("decoded")
    return SpikingModel(model, tokenizer, sites, record, prefix, rotations if rotation is not None else "applied")
