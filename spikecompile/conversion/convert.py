"""ANN -> spiking model: load, rotate, install sites, calibrate, fit, save model.pt; and load it back."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from .. import __version__, modelfile
from ..data import load_text, token_windows
from ..devices import Placement, cpu_info, peak_memory_mb
from ..errors import SpikecompileError
from ..files import check_writable
from ..heap import release_freed_memory
from ..loading import ModelSource, load_model, open_layered, prefix_cache_folder, resolve_source, verify_source
from ..modelschema import TIMESTEP_RANGE, WEIGHT_BITS, check_prefix_vocabulary
from ..neuron import PhaseNeuronParams
from ..parallel import Ranks
from ..progress import shown
from .budget import BUDGET_KINDS, TIMESTEP_CHOICES, allocate, next_token_loss, site_curves, site_fisher_part
from .checkpoint import Checkpoint
from .codings import CODINGS, SDLLM_COUNT_BITS, SDLLM_SCALES, SIGNED_CODINGS, sdllm_steps, sdllm_unit
from .fit import FITTED, FitConfig, SiteFit, fit_sites, lloyd_max_mse, spikes_per_activation
from .prefix import (OUTLIER_ETA, PrefixCache, SelectionCache, anchor_candidates, outlier_mask, prefix_record,
                     probe_windows)
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
    layers: int = 0
    layer_s: list = field(default_factory=list)
    """seconds per calibrated decoder layer (build, rotate, run every window, checkpoint), in this run"""
    prefix_layer_s: list = field(default_factory=list)
    """seconds per decoder layer of the prefix selection's scan (build, rotate, run every probe), in this run"""
    prefix_cached: bool = False
    """the prefix selection was read from the cache (prefix.SelectionCache), not scanned"""


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
    store: object = None
    """a weightless model's tensors (conversion.layered.LayeredStore, read a part at a time), for frontend.trace;
    None: the model's own state_dict"""

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
            placement: Placement = Placement(), resume: bool = False,
            on_layer: Callable[[int], None] | None = None, cost_model=None,
            part_memory: int | None = None, ranks: Ranks = Ranks()) -> ConversionReport | None:
    """Convert the source model into model.pt, one decoder layer at a time (docs: "layer-sequential conversion").

    placement: the device and dtype of the float forward (resolved by devices.resolve_placement before this); the
    fit and everything model.pt holds stay fp32 on the CPU. A checkpoint beside the output (checkpoint.Checkpoint)
    is written after each calibrated layer; resume continues from it (refused, before any weight is read, when it
    was made with other options). on_layer(index): called after layer `index` is calibrated and checkpointed.
    cost_model (with a budget only): cost_model(config dict, kind, seq_len, grains) -> an object with `groups`
    (the sites that must share T), `linear()` (a budget.LinearCost) and `measure(timesteps, spikes)`, the ledger's
    (spikecompile.budget.LedgerCost; passed in because the ledger lives in a layer above conversion).
    part_memory: bytes of one part the device may hold (LayerStream.dispatched: a larger one runs through
    accelerate's offload); not an option of the model: model.pt and the checkpoint's options do not record it.
    ranks: this process's place among torchrun's processes (spikecompile.parallel). Each rank calibrates its share
    of the windows and scans its share of the prefix candidates; rank 0 writes the checkpoint and model.pt, the
    same bytes as one process's, and returns the report (the others return None).
    """
    options.validate()
    if ranks.world > 1 and options.budget:
        raise SpikecompileError(f"{BUDGET_KINDS[options.budget[0]]} with {ranks.world} processes: the budget's "
                                f"sensitivity pass runs in one process; start convert without torchrun")
    progress = progress and ranks.is_main
    if part_memory is not None and options.budget:
        raise SpikecompileError(f"--part-memory with {BUDGET_KINDS[options.budget[0]]}: the budget's sensitivity pass "
                                f"runs each layer backward whole; drop --part-memory or the budget")
    if options.budget and cost_model is None:
        raise SpikecompileError(f"{BUDGET_KINDS[options.budget[0]]}: a budget needs the ledger's cost model; "
                                f"pass cost_model=spikecompile.budget.LedgerCost")
    check_writable(output)
    calib_text = load_text(options.calib, split="calib")
    source = resolve_source(model_spec)
    checkpoint = Checkpoint(output, writes=ranks.is_main)
    manifest = {"options": asdict(options), "placement": asdict(placement), "source": source.path,
                "source_sha256": source.sha256, "calibration_sha256": calib_text.sha256, "spikecompile": __version__}
    resumed = checkpoint.resume(manifest) if resume else None  # refused here: before any weight is read
    torch.manual_seed(options.seed)
    timings = {}
    try:
        calibrated, prefix, windows, layers = _stream(source, calib_text, options, placement, part_memory, checkpoint,
                                                      manifest, resumed, timings, progress, on_layer, ranks)
        if not ranks.is_main:  # rank 0 fits and writes model.pt
            return None
        start = time.perf_counter()
        fit_config, rows, budget = _fit(calibrated, options, cost_model, progress)
        timings["fitting"] = time.perf_counter() - start
    except SpikecompileError:  # a user error (an infeasible budget too): no resume of this checkpoint could help
        checkpoint.remove()
        raise
    samples = calibrated.samples

    record = {
        "source": source.to_dict(),
        "rotation": _canonical(calibrated.rotation),
        "weights": rtn_record(options.weight_bits, layers) if options.weight_bits else None,
        "prefix": _canonical(prefix),
        "coding": {"name": options.coding, "timesteps": fit_config.T, "grains": rows[0][0].n_grains,
                   **({"scales": "per-token"} if options.sdllm_scales == "per-token" else {})},
        "sites": _site_table(calibrated.names, rows, samples),
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
    checkpoint.remove()
    peaks = peak_memory_mb()
    return ConversionReport(output=str(output), sites=len(calibrated.names), timings_s=timings,
                            peak_rss_mb=peaks["peak_rss_mb"], peak_gpu_mb=peaks.get("peak_gpu_mb"),
                            placement=asdict(placement), layers=layers, layer_s=calibrated.layer_s,
                            prefix_layer_s=timings.pop("prefix_layers", []),
                            prefix_cached=timings.pop("prefix_cached", False))


def _fit(calibrated: Calibrated, options: ConvertOptions, cost_model, progress: bool):
    """Fit every site: at options.timesteps, or with a budget at the T allocated to it (_fit_under_budget).
    Returns (the FitConfig model.pt records, per site (neuron, calibration record), the budget record or None)."""
    samples = calibrated.samples
    fit_config = FitConfig(T=options.timesteps, n_grains=options.grains, coding=options.coding,
                           membrane_clip=options.membrane_clip, seed=options.seed, spike_penalty=options.spike_penalty)
    if not options.budget:
        return fit_config, _fit_rows(fit_sites(samples, fit_config, progress=progress), samples), None
    cost = cost_model(calibrated.config, options.budget[0], options.calib_seqlen, options.grains)
    rows, budget = _fit_under_budget(samples, calibrated.names, calibrated.fisher, cost, fit_config, options,
                                     progress)
    return replace(fit_config, T=max(budget["timesteps"].values())), rows, budget


def _canonical(document):
    """A JSON-like record rebuilt from its JSON text: the same values whether it was made in this run or read back
    from the checkpoint, and the same bytes in model.pt (pickle writes a string shared by two places once)."""
    return json.loads(json.dumps(document))


def _stream(source, calib_text, options: ConvertOptions, placement: Placement, part_memory: int | None,
            checkpoint: Checkpoint, manifest: dict, resumed, timings: dict, progress: bool, on_layer,
            ranks: Ranks = Ranks()):
    """Open the source, check its tensors, start the checkpoint (or go on from `resumed`), select the prefix and
    calibrate, layer by layer, and with a budget compute the site sensitivities (fisher_streamed); returns
    (Calibrated, the prefix record, the windows, the layer count)."""
    start = time.perf_counter()
    with open_layered(source, progress) as layered:
        stream = LayerStream(layered, placement, part_memory)
        layered.weights.check_names(stream.tensor_names(), EMBEDDING_ALIAS, source.path)
        windows = token_windows(layered.tokenizer, calib_text, options.calib_seqlen, options.calib_windows,
                                "calibration")
        if len(windows) < ranks.world:
            raise SpikecompileError(f"--calib-windows: {len(windows)} calibration windows for {ranks.world} "
                                    f"processes; give at least one window per process, or fewer processes")
        windows = [ids.to(placement.device) for ids in windows]
        resumed = resumed or checkpoint.start(manifest)
        timings["load"] = time.perf_counter() - start

        start = time.perf_counter()
        prefix, embedded = resumed.prefix, None
        if not resumed.prefix_known:
            timings["prefix_layers"] = []
            if options.prefix == "auto":
                cache = _selection_cache(source, layered.tokenizer, windows, options, placement, ranks)
                prefix, rows = cache.read(stream.config.hidden_size, placement.torch_dtype) if cache else (None, None)
                timings["prefix_cached"] = prefix is not None
                if rows is not None:
                    embedded = EmbeddedRows.of(**{name: tensor.to(placement.device) for name, tensor in rows.items()})
                if prefix is None:
                    prefix, embedded = select_prefix_streamed(stream, layered.tokenizer, windows, options, progress,
                                                              timings["prefix_layers"], ranks)
                    if cache is not None:
                        cache.write(prefix, {"token_ids": embedded.token_ids, "rows": embedded.rows})
            else:
                prefix = None
            checkpoint.save_prefix(prefix)
        timings["prefix"] = time.perf_counter() - start

        start = time.perf_counter()
        calibrated = calibrate_streamed(stream, windows, prefix, options, checkpoint, resumed.state, progress,
                                        on_layer, embedded, ranks)
        timings["calibration"] = time.perf_counter() - start
        calibrated.config = stream.config.to_dict()

        if options.budget:
            start = time.perf_counter()
            calibrated.fisher = fisher_streamed(stream, windows, prefix, options, checkpoint, calibrated.names,
                                                progress)
            timings["sensitivity"] = time.perf_counter() - start
    return calibrated, prefix, windows, stream.layers


def _selection_cache(source: ModelSource, tokenizer, windows: list[torch.Tensor], options: ConvertOptions,
                     placement: Placement, ranks: Ranks) -> SelectionCache | None:
    """The prefix-selection cache entry of this conversion, or None: no cache ($SPIKECOMPILE_CACHE=off), or
    several processes (they must all scan or all read, and another conversion may write the entry between)."""
    folder = prefix_cache_folder()
    if folder is None or ranks.world > 1:
        return None
    probe = hashlib.sha256()
    for ids in probe_windows(windows):
        probe.update(ids.cpu().numpy().tobytes())
    fingerprint = {
        "format": 1, "spikecompile_sources": _package_sources_sha256(), "libraries": _forward_libraries(),
        "processor": _processor(placement.device), "threads": torch.get_num_threads(), "placement": asdict(placement),
        "source_sha256": source.sha256, "tokenizer_sha256": _tokenizer_sha256(tokenizer),
        "probe_sha256": probe.hexdigest(),
        "rotate": options.rotate, "seed": options.seed, "weight_bits": options.weight_bits,
    }
    return SelectionCache(folder, fingerprint)


@functools.cache
def _package_sources_sha256() -> str:
    """sha256 of this package's Python sources: a cached selection made by other code is never read."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, subfolders, names in sorted(os.walk(package, followlinks=True)):
        subfolders.sort()
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, package).encode())
                with open(path, "rb") as source:
                    digest.update(source.read())
    return digest.hexdigest()


def _forward_libraries() -> dict:
    """The versions of the libraries whose code runs in (or feeds) the float forward: None where not installed
    (fast-hadamard-transform replaces the online Hadamard on CUDA; gguf dequantizes a GGUF source)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    names = ("torch", "transformers", "accelerate", "kernels", "safetensors", "gguf", "fast-hadamard-transform")
    return {name: installed(name) for name in names}


def _processor(device: str) -> str:
    """What the float forward's kernels round by: the GPU and CUDA version, or the CPU (MKL's GEMMs round otherwise
    on an AMD EPYC than on an Intel CPU of the same capability) and the capability ATen dispatches to."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    return f"{cpu_info('model name') or 'unknown CPU'}, {torch.backends.cpu.get_cpu_capability()}"


def _tokenizer_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's class, vocabulary and special tokens (an HF folder's sha256 covers only its
    config and weights)."""
    document = [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens]
    return hashlib.sha256(json.dumps(document).encode()).hexdigest()


EMBEDDING_ALIAS = {"model.embed_tokens.weight": "lm_head.weight"}
"""A tied embedding may be stored once, under lm_head's name (safetensors' save_model keeps one of tied tensors)."""


def _new_rotation(stream: LayerStream, options: ConvertOptions) -> ResidualRotation | None:
    if options.rotate != "hadamard":
        return None
    head_dim = stream.skeleton.model.layers[0].self_attn.head_dim
    return ResidualRotation(stream.config.hidden_size, head_dim, options.seed, untied=stream.tied)


def converted_layer(stream: LayerStream, index: int, rotation: ResidualRotation | None,
                    weight_bits: int | None) -> tuple[torch.nn.Module, SiteTable]:
    """Decoder layer `index` as the converted model has it: rotated, its weights RTN-quantized to `weight_bits`
    (None: float), its spike sites installed (off: the float layer)."""
    layer = stream.layer(index)
    if rotation is not None:
        rotation.rotate_layer(layer, f"model.layers.{index}")
    if weight_bits:
        rtn_quantize_layer(layer, weight_bits)
    sites = install_layer_sites(layer, index)
    return stream.dispatched(layer), sites


def _embedding(stream: LayerStream, rotation: ResidualRotation | None) -> torch.nn.Embedding:
    """The (rotated) embedding."""
    embedding = stream.embedding()
    if rotation is not None:
        rotation.rotate_embedding(embedding, "model.embed_tokens")
    return stream.dispatched(embedding)


def _final_norm(stream: LayerStream, rotation: ResidualRotation | None, head) -> torch.nn.Module:
    """The (folded) final norm; `head` (lm_head, or None) is rotated in place and dispatched with it."""
    norm = stream.norm()
    if rotation is not None:
        rotation.rotate_head(norm, head, "model.norm", "lm_head")
    if head is not None:
        stream.dispatched(head)  # in place: dispatch_model hooks the module it is given
    return stream.dispatched(norm)


class EmbeddedRows:
    """Rows of the (rotated) embedding kept for a later pass, so that it need not build and rotate the whole
    embedding again (a 128256 × 4096 one is seconds of float64 work on a CPU): rows(ids) is embedding(ids), the
    same bits, for the token ids it was built with."""

    def __init__(self, embedding: torch.nn.Embedding, token_ids: torch.Tensor):
        self.token_ids = torch.unique(token_ids.flatten())  # sorted
        with torch.inference_mode():
            self.rows = embedding(self.token_ids)

    @classmethod
    def of(cls, token_ids: torch.Tensor, rows: torch.Tensor) -> EmbeddedRows:
        """Rows kept before (prefix.SelectionCache): token_ids sorted and unique, rows[i] the row of token_ids[i]."""
        kept = cls.__new__(cls)
        kept.token_ids, kept.rows = token_ids, rows
        return kept

    def covers(self, ids: torch.Tensor) -> bool:
        return bool(torch.isin(ids.to(self.token_ids.device), self.token_ids).all())

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows[torch.searchsorted(self.token_ids, ids)]


def select_prefix_streamed(stream: LayerStream, tokenizer, windows: list[torch.Tensor], options: ConvertOptions,
                           progress: bool, layer_s: list | None = None,
                           ranks: Ranks = Ranks()) -> tuple[dict, EmbeddedRows]:
    """prefix.select_prefix, one layer at a time: every scan (the probe windows alone, and after each anchor) goes
    through each layer before the next is built; the final norm and lm_head give their NLL at the end. layer_s:
    gets the seconds each layer took. Returns the prefix record and the embedding's rows of every window token and
    anchor (the prefix's tokens are among them), for calibrate_streamed. ranks: each rank runs its share of the
    scans; their masks and NLLs are gathered, in scan order."""
    probe, anchors = probe_windows(windows), anchor_candidates(tokenizer)
    rotation = _new_rotation(stream, options)
    embedding = _embedding(stream, rotation)
    device = stream.placement.device
    embedded = EmbeddedRows(embedding, torch.cat([*(ids.flatten() for ids in windows),
                                                  torch.tensor(anchors, device=device)]))
    every_scan = [None, *anchors]  # None: the probe windows without a prefix
    scans, prefixes = {}, {}
    with torch.inference_mode():
        for anchor in (every_scan[k] for k in ranks.share(len(every_scan))):
            if anchor is None:
                scans[None] = [stream.start(ids, embedding(ids), use_cache=False) for ids in probe]
                continue
            anchor_ids = torch.tensor([[anchor]], device=device)
            prefixes[anchor] = stream.start(anchor_ids, embedding(anchor_ids), is_prefix=True)
            scans[anchor] = [stream.start(ids, embedding(ids), prefix=prefixes[anchor]) for ids in probe]
    del embedding
    peaks = {id(sequence): [] for sequences in scans.values() for sequence in sequences}
    for index in tqdm(range(stream.layers), desc="prefix scan", unit="layer", disable=not shown(progress)):
        if not scans:  # more ranks than scans: this one has none (its rotation record is never read)
            continue
        began = time.perf_counter()
        layer, _ = converted_layer(stream, index, rotation, options.weight_bits)
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
        release_freed_memory()
        if layer_s is not None:
            layer_s.append(time.perf_counter() - began)
    results = {}
    if scans:
        head = stream.lm_head()  # built last: a tied one is a copy of the embedding before its rotation
        norm = _final_norm(stream, rotation, head)
    with torch.inference_mode():
        for anchor, sequences in scans.items():
            masks, nll = [], 0.0
            for sequence in sequences:
                if anchor is not None:  # the scan without a prefix gives only outlier masks (prefix_record)
                    logits = head(norm(sequence.hidden))
                    nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], sequence.ids[0, 1:]))
                masks.append(outlier_mask(peaks[id(sequence)], OUTLIER_ETA).cpu())
            results[anchor] = (masks, nll / len(sequences))
    gathered = {anchor: result for part in ranks.gather(results) for anchor, result in part.items()}
    return prefix_record(tokenizer, probe, {anchor: gathered[anchor] for anchor in every_scan}), embedded


@dataclass
class Calibrated:
    """The streamed calibration's result: site names and samples [S, N] in model order, the rotation record, and
    the seconds each layer took (this run's layers only, when resumed)."""

    names: list[str]
    samples: torch.Tensor
    rotation: dict | None
    layer_s: list[float]
    config: dict = field(default_factory=dict)
    """the model's config (its to_dict: the budget's cost model traces the model from it)"""
    fisher: torch.Tensor | None = None
    """with a budget: [S] each site's sensitivity (conversion.budget.site_fisher), from fisher_streamed"""


def calibrate_streamed(stream: LayerStream, windows: list[torch.Tensor], prefix: dict | None,
                       options: ConvertOptions, checkpoint: Checkpoint, state: dict | None, progress: bool,
                       on_layer: Callable[[int], None] | None = None,
                       embedded: EmbeddedRows | None = None, ranks: Ranks = Ranks()) -> Calibrated:
    """calibration.collect_samples, one layer at a time: the prefix and every window go through a layer (its sites
    recording the windows), its samples are kept, the state is checkpointed, and the layer is freed.

    Each site's recorder is seeded seed·100003 + its index in the model's site table and draws
    ceil(N / windows) values per window, as collect_samples does on the whole model. With a budget, the hidden
    states entering each layer (and the final norm) are also kept in the checkpoint for fisher_streamed. embedded:
    the prefix pass's embedding rows; the embedding is built again when they do not cover the tokens. ranks: each
    rank runs its share of the windows; the samples and the checkpoint's hidden states are gathered in window order.
    """
    per_call = math.ceil(options.samples_per_site / len(windows))
    mine = ranks.share(len(windows))
    rotation = _new_rotation(stream, options)
    if state is None:
        prefix_ids = torch.tensor(prefix["token_ids"] if prefix else [], dtype=torch.int64)
        if embedded is not None and embedded.covers(torch.cat([prefix_ids, *(ids.flatten().cpu() for ids in windows)])):
            embedding = embedded
            if rotation is not None:
                rotation.rotate_embedding(None, "model.embed_tokens")
        else:
            embedding = _embedding(stream, rotation)
        with torch.inference_mode():
            hidden_prefix = embedding(torch.tensor([prefix["token_ids"]], device=stream.placement.device)) \
                if prefix else None
            hidden_windows = [embedding(windows[k]) for k in mine]
        del embedding
        first, names, chunks = 0, [], []
    else:  # the checkpoint's layers are done: their samples, the rotation record so far, the hidden states after
        first, names, chunks = state["after_layer"] + 1, state["names"], [state["samples"]]
        hidden_prefix, hidden_windows = state["prefix"], [state["windows"][k] for k in mine]
        if rotation is not None:
            rotation.record = state["rotation"]
    prefix_sequence = stream.start(torch.tensor([prefix["token_ids"]]), hidden_prefix, is_prefix=True) \
        if prefix else None
    use_cache = bool(getattr(stream.config, "use_cache", True)) or prefix_sequence is not None
    sequences = [stream.start(windows[k], hidden, prefix=prefix_sequence, use_cache=use_cache)
                 for k, hidden in zip(mine, hidden_windows, strict=True)]
    layer_s = []
    for index in tqdm(range(first, stream.layers), desc="calibrate", unit="layer", disable=not shown(progress),
                      initial=first, total=stream.layers):
        began = time.perf_counter()
        if options.budget:
            _save_inputs(checkpoint, index, prefix_sequence, sequences)
        layer, sites = converted_layer(stream, index, rotation, options.weight_bits)
        chunks.append(_recorded(sites, per_call, options, len(names), stream, prefix_sequence, sequences, layer,
                                ranks, mine.start))
        names += list(sites)
        del layer, sites
        release_freed_memory()
        checkpoint.save_state({
            "after_layer": index, "names": names, "samples": torch.cat(chunks), "rotation": rotation and rotation.record,
            "prefix": prefix_sequence.hidden.cpu() if prefix_sequence else None,
            "windows": [hidden for part in ranks.gather([sequence.hidden.cpu() for sequence in sequences])
                        for hidden in part]})
        chunks = [torch.cat(chunks)]
        layer_s.append(time.perf_counter() - began)
        if on_layer is not None:
            on_layer(index)
    if options.budget:
        _save_inputs(checkpoint, stream.layers, None, sequences)
    norm, final = _final_norm_site(stream, rotation, None)
    chunks.append(_recorded(final, per_call, options, len(names), stream, None, sequences, norm, ranks, mine.start))
    return Calibrated([*names, "final_norm"], torch.cat(chunks), rotation and rotation.record, layer_s)


def _save_inputs(checkpoint: Checkpoint, index: int, prefix_sequence, sequences) -> None:
    """The hidden states entering layer `index` (the final norm: index = the layer count) into the checkpoint."""
    checkpoint.save_inputs(index, {"prefix": prefix_sequence.hidden.cpu() if prefix_sequence else None,
                                   "windows": [sequence.hidden.cpu() for sequence in sequences]})


def _final_norm_site(stream: LayerStream, rotation: ResidualRotation | None, head) -> tuple[torch.nn.Module, SiteTable]:
    """The (folded) final norm with the final_norm site on its output, as install_sites puts it on a whole model."""
    norm = _final_norm(stream, rotation, head)
    final = SiteTable({"final_norm": SpikeSite(site_name(None, "final_norm"))})
    norm.register_forward_hook(lambda module, inputs, output: final["final_norm"](output))
    return norm, final


def fisher_streamed(stream: LayerStream, windows: list[torch.Tensor], prefix: dict | None, options: ConvertOptions,
                    checkpoint: Checkpoint, names: list[str], progress: bool) -> torch.Tensor:
    """conversion.budget.site_fisher of the converted model (rotated, RTN-quantized, sites off, after the KV
    prefix), one part at a time and backward: the final norm and lm_head give each window's loss and its gradient
    at the last layer's output; then each layer, from the last, is built again, run with gradients on the inputs
    calibrate_streamed kept in the checkpoint, and back-propagated (per-layer gradient checkpointing). Only one
    layer and the windows' hidden states and gradients are held at a time. The chain rule makes it the whole
    model's Fisher up to the order of float additions (tests/test_budget.py compares the two)."""
    totals = torch.zeros(len(names), dtype=torch.float64)
    rotation = _new_rotation(stream, options)  # a fresh one: this pass needs its weights, not its record
    head = stream.lm_head()  # a tied one: a copy of the embedding before its rotation, as select_prefix_streamed's
    norm, final = _final_norm_site(stream, rotation, head)
    device = stream.placement.device
    saved = checkpoint.load_inputs(stream.layers)
    upstream = site_fisher_part(lambda k, hidden: next_token_loss(head(norm(hidden)), windows[k]), final,
                                [hidden.to(device) for hidden in saved["windows"]], totals, names.index("final_norm"))
    del head, norm
    prefix_ids = torch.tensor([prefix["token_ids"]], device=device) if prefix else None
    for index in tqdm(reversed(range(stream.layers)), desc="sensitivity", unit="layer", disable=not shown(progress),
                      total=stream.layers):
        layer, sites = converted_layer(stream, index, rotation, options.weight_bits)
        saved = checkpoint.load_inputs(index)
        prefix_sequence = stream.start(prefix_ids, saved["prefix"], is_prefix=True) if prefix else None
        if prefix_sequence is not None:  # its keys and values here, which the windows attend to (no gradient)
            stream.run(layer, prefix_sequence)
        use_cache = bool(getattr(stream.config, "use_cache", True)) or prefix_sequence is not None
        with torch.no_grad():
            sequences = [stream.begin(ids, hidden, prefix=prefix_sequence, use_cache=use_cache)
                         for ids, hidden in zip(windows, saved["windows"], strict=True)]
        upstream = site_fisher_part(lambda k, hidden: stream.forward(layer, sequences[k], hidden), sites,
                                    [sequence.hidden for sequence in sequences], totals, names.index(next(iter(sites))),
                                    upstream)
        del layer, sites, sequences
        release_freed_memory()
    return totals


def _recorded(sites: SiteTable, per_call: int, options: ConvertOptions, first_index: int, stream: LayerStream,
              prefix_sequence, sequences, module, ranks: Ranks = Ranks(), first_window: int = 0) -> torch.Tensor:
    """Run the prefix (sites off) and the windows (sites recording) through `module` (a decoder layer, or the
    final norm: then the windows' hidden states stay); return the sites' samples [sites, N]. With several ranks,
    `sequences` are windows first_window, first_window + 1, ... of them all, and every rank's samples are gathered
    in window order: each site's the same values as one process's."""
    for offset, site in enumerate(sites.values()):
        site.recorder = SampleRecorder(per_call, seed=options.seed * 100_003 + first_index + offset,
                                       skipped_calls=first_window)
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
    parts = ranks.gather([site.recorder.samples() for site in sites.values()])
    return torch.stack([torch.cat([part[k] for part in parts])[:options.samples_per_site] for k in range(len(sites))])


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


def recorded_site_neuron(record: dict, name: str) -> tuple[PhaseNeuronParams, int]:
    """Site `name`'s neuron as model.pt runs it, with the L of its per-token scales (0: its τ is the site's
    constant): converted with --sdllm-scales per-token, the sdllm neuron at τ = 1 with L = K = T − 1
    (codings.sdllm_per_token)."""
    coding = record.get("coding", {})
    if coding.get("scales") == "per-token":
        return sdllm_unit(coding["timesteps"]), coding["timesteps"] - 1
    return site_neuron(record["sites"][name]), 0


def _on_device(neuron: PhaseNeuronParams, device: str) -> PhaseNeuronParams:
    """The neuron's tensors on `device` (the same object on the CPU, where model.pt's tensors are)."""
    if device == "cpu":
        return neuron
    import dataclasses

    moved = {item.name: getattr(neuron, item.name) for item in dataclasses.fields(neuron)}
    return dataclasses.replace(neuron, **{name: value.to(device) if isinstance(value, torch.Tensor) else value
                                          for name, value in moved.items()})


def fill_sites(sites: SiteTable, record: dict, path, device: str) -> None:
    """Each site's neuron, on `device`, from model.pt; sdllm per-token scales where recorded. One line naming
    `path` and the site for an invalid neuron."""
    coding = record["coding"]
    for name, site in sites.items():
        try:
            site.neuron = _on_device(site_neuron(record["sites"][name]), device)
        except (KeyError, ValueError, TypeError) as error:
            raise SpikecompileError(f"{path}: site {name} has an invalid neuron ({error})") from None
        if coding.get("scales") == "per-token":
            site.per_token_steps = coding["timesteps"]


def check_rebuilt(record: dict, rotation: dict | None, weights: dict | None, path) -> None:
    """The rotation record and weight-quantization record that re-applying model.pt's options gave (None: not
    applied) must be model.pt's: a model.pt made with other matrices or rounding is refused in one line."""
    if rotation is not None and _canonical(rotation) != _canonical(record["rotation"]):
        raise SpikecompileError(f"{path}: re-applying the recorded rotation gave a different record; re-convert")
    if weights is not None and weights != record.get("weights"):
        raise SpikecompileError(f"{path}: re-applying the recorded weight quantization gave a different record; "
                                f"re-convert")


def recorded_source(record: dict, path, source_path: str | None = None) -> ModelSource:
    """model.pt's source model (at `source_path` when given: it moved since conversion), checked against the
    recorded sha256 (one-line error naming `path`)."""
    source = ModelSource(**record["source"])
    if source_path is not None:
        source = ModelSource(source.kind if source.kind != "embedded" else "gguf", source_path, source.sha256)
    verify_source(source, where=str(path))
    return source


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
    source = recorded_source(record, path, source_path)
    model, tokenizer = load_model(source, placement, progress)
    check_prefix_vocabulary(record, model.get_input_embeddings().num_embeddings, str(path), source.path)
    rotation = record["rotation"]
    rotated = rotate_llama(model, seed=rotation["seed"], apply=rotations == "applied") if rotation is not None else None
    weights = record.get("weights")
    check_rebuilt(record, rotated, rtn_quantize_weights(model, weights["bits"]) if weights else None, path)
    sites = install_sites(model)
    if list(sites) != list(record["sites"]):
        raise SpikecompileError(f"{path}: its spike-site table does not match the model's layers; re-convert")
    fill_sites(sites, record, path, placement.device)
    prefix = PrefixCache(model, sites, record["prefix"]["token_ids"]) if record["prefix"] else None
    sites.set_mode("decoded")
    return SpikingModel(model, tokenizer, sites, record, prefix, rotations if rotation is not None else "applied")
