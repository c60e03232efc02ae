"""The schema of model.pt (format version 2, described in modelfile's docstring), checked in one place.

`record_fault(payload)` validates a whole record when model.pt is read (and before it is written), so
everything after modelfile.load may trust its types, ranges and cross-field consistency. A fault is one line that
names the file and the field, e.g. `model.pt: sites.layers.3.silu.tau: must be a finite float32 scalar in
[1e-15, 1e+15], got a str`. The one check that needs the source model (prefix token ids inside its vocabulary)
is `check_prefix_vocabulary`, called once the source model is loaded.

The rules, beyond each field's type:
- every T (coding.timesteps, each site's timesteps) is in TIMESTEP_RANGE, sdllm's in SDLLM_TIMESTEPS;
  a site's genotype has its T steps, starts at grain 0, rises by 0 or 1 per step and ends at the last grain
  of d/h/theta, which have coding.grains entries each; 0 ≤ max_spikes < T
- the site's name is `layers.{layer}.{kind}` (or final_norm, layer None)
- floats are finite and within magnitudes a real model can have: τ and |v0| in [MIN_SCALE, MAX_SCALE] (v0 may be 0
  or negative), bases d, h, θ in [1, MAX_BASE] (so every threshold τ·θ^-(t+1) stays a normal float32)
- source is {kind, path, sha256} and nothing else (it becomes loading.ModelSource)

The constants that say what a model may hold (codings, T range, weight widths) live here, below conversion,
which imports them from this module.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, ValidationError, model_validator

from .errors import SpikecompileError
from .ir.neurons import LAYER_SITE_KINDS

CODINGS = ("phase", "las", "spikedattn", "rate", "ttfs", "sdllm")  # the unsigned codings (every backend lowers them)
SIGNED_CODINGS = ("phase-sd",)  # signed-digit codings: their sites hold signed_digits: true
TIMESTEP_RANGE = (4, 16)
SDLLM_COUNT_BITS = (3, 4, 5)  # D = 2^(b−1) ∈ {4, 8, 16} steps: the timestep range
WEIGHT_BITS = (4, 6, 8)
SOURCE_KINDS = ("hf_folder", "gguf", "embedded")
MIN_SCALE, MAX_SCALE = 1e-15, 1e15
MAX_BASE = 16.0
MAX_PREFIX_TOKENS = 64
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def sdllm_steps(count_bits: int) -> int:
    """D = 2^(b−1) virtual steps unfold a symmetric b-bit count (|count| ≤ 2^(b−1) − 1)."""
    return 2 ** (count_bits - 1)


SDLLM_TIMESTEPS = tuple(sdllm_steps(bits) for bits in SDLLM_COUNT_BITS)


class FieldError(ValueError):
    """A cross-field fault found by a model validator, at `field` (dotted, relative to the validated record)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def describe(value: Any) -> str:
    """A short account of a value for an error message: `a str`, `40`, `a float64 tensor of shape (3,)`."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str) and len(value) <= 40:
        return f"the str {value!r}"
    return f"a {type(value).__name__}"


# --- tensors (pydantic knows no torch type: one plain validator each) ---

def _tensor(dtype: torch.dtype, ndim: int, low: float | None = None, high: float | None = None):
    """A tensor field: exactly this dtype and rank, non-empty, finite, every element in [low, high]."""
    rank = "scalar" if ndim == 0 else "vector"
    bounds = f" in [{low:g}, {high:g}]" if low is not None else ""
    kind = f"{'finite ' if dtype.is_floating_point else ''}{str(dtype).removeprefix('torch.')} {rank}{bounds}"
    spec = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"

    def check(value):
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.ndim != ndim or not value.numel():
            raise ValueError(f"must be {spec}, got {describe(value)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"must be {spec}, got a non-finite value ({value[~torch.isfinite(value)].flatten()[0]})")
        if low is not None:
            outside = (value < low) | (value > high)
            if bool(outside.any()):
                raise ValueError(f"must be {spec}, got {float(value[outside].flatten()[0]):g}")
        return value

    return Annotated[Any, PlainValidator(check)]


def _magnitude_within(limit: float):
    def check(value: torch.Tensor) -> torch.Tensor:
        if float(value.abs()) > limit:
            raise ValueError(f"|value| must be at most {limit:g}, got {float(value):g}")
        return value

    return AfterValidator(check)


def _int_in(low: int, high: int, what: str = ""):
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be in {low}..{high}{what}, got {value}")
        return value

    return Annotated[int, AfterValidator(check)]


Timesteps = _int_in(*TIMESTEP_RANGE, " (the supported T)")
Seed = _int_in(*SEED_RANGE)
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
Measure = Annotated[float, Field(ge=0, le=1e30)]  # an error or magnitude from calibration


def _sha256_hex(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"must be a sha256 (64 lowercase hex digits), got {describe(value)}")
    return value


def _some_sites(sites: dict) -> dict:
    if not sites:
        raise ValueError("must hold the spike sites, got none")
    return sites


class Record(BaseModel):
    """Strict types (no "8" for 8, no 1 for True), no NaN/inf floats; keys not named here are ignored.
    The base of every file schema here and of those that read other files (backends.sim.measure: sim.json)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class Source(Record):
    model_config = ConfigDict(extra="forbid")  # becomes loading.ModelSource(**source)
    kind: Literal[SOURCE_KINDS]
    path: Annotated[str, Field(min_length=1)]
    sha256: Annotated[str, AfterValidator(_sha256_hex)]


class Rotation(Record):
    method: Literal["hadamard"]
    seed: Seed


class Weights(Record):
    method: Literal["rtn"]
    bits: Literal[WEIGHT_BITS]
    grid: str
    linears: Count


class Prefix(Record):
    token_ids: Annotated[list[Count], Field(min_length=1, max_length=MAX_PREFIX_TOKENS)]
    tokens: list[str]
    eta: Annotated[float, Field(gt=0, le=MAX_SCALE)]
    outlier_counts: dict[str, Count]

    @model_validator(mode="after")
    def _one_token_per_id(self):
        if len(self.tokens) != len(self.token_ids):
            raise FieldError("tokens", f"has {len(self.tokens)} entries, token_ids has {len(self.token_ids)}")
        return self


class Coding(Record):
    name: Literal[(*CODINGS, *SIGNED_CODINGS)]
    timesteps: Timesteps
    grains: Positive
    scales: Literal["static", "per-token"] = "static"  # written only when per-token (sdllm's run-time min-max)

    @model_validator(mode="after")
    def _per_token_is_sdllm(self):
        if self.scales == "per-token" and self.name != "sdllm":
            raise FieldError("scales", f"per-token scales are sdllm's, got coding {self.name}")
        return self

    @model_validator(mode="after")
    def _grains_fit(self):
        if self.grains > self.timesteps // 2:
            raise FieldError("grains", f"must be in 1..T/2 = 1..{self.timesteps // 2}, got {self.grains}")
        if self.name == "sdllm" and self.timesteps not in SDLLM_TIMESTEPS:
            raise FieldError("timesteps", f"sdllm runs T in {SDLLM_TIMESTEPS}, got {self.timesteps}")
        return self


class SiteCalibration(Record):
    mse: Measure
    base2_tau: Measure
    base2_mse: Measure
    lloyd_max_mse: Measure
    lloyd_max_levels: Positive
    max_abs: Measure


Scale = _tensor(torch.float32, 0, MIN_SCALE, MAX_SCALE)
Bases = _tensor(torch.float32, 1, 1.0, MAX_BASE)


class Site(Record):
    layer: Count | None
    kind: Literal[(*LAYER_SITE_KINDS, "final_norm")]
    timesteps: Timesteps
    genotype: _tensor(torch.int64, 1)
    tau: Scale
    d: Bases
    h: Bases
    theta: Bases
    v0: Annotated[_tensor(torch.float32, 0), _magnitude_within(MAX_SCALE)]
    max_spikes: Count
    signed_digits: bool = False  # the signed-digit neuron (coding phase-sd); absent in files before it
    calibration: SiteCalibration
    samples: _tensor(torch.float32, 1) | None = None

    @model_validator(mode="after")
    def _consistent(self):
        steps = self.genotype.numel()
        if steps != self.timesteps:
            raise FieldError("genotype", f"has {steps} steps, timesteps is {self.timesteps}")
        rises = self.genotype.diff()
        if int(self.genotype[0]) != 0 or not bool(((rises == 0) | (rises == 1)).all()):
            raise FieldError("genotype", f"must start at grain 0 and rise by 0 or 1 per step (one contiguous block "
                                         f"of steps per grain), got {self.genotype.tolist()}")
        grains = int(self.genotype[-1]) + 1
        for name in ("d", "h", "theta"):
            if getattr(self, name).numel() != grains:
                raise FieldError(name, f"has {getattr(self, name).numel()} grains, its genotype has {grains}")
        if self.max_spikes >= self.timesteps:
            raise FieldError("max_spikes", f"must be below timesteps = {self.timesteps}, got {self.max_spikes}")
        return self


class Calibration(Record):
    source: str
    sha256: str
    windows: Positive
    seqlen: Positive
    samples_per_site: Positive


class Conversion(Record):
    spikecompile: str
    torch: str
    transformers: str
    seed: Seed
    fit: dict
    options: dict
    created_utc: str


class Budget(Record):
    """A per-site budget's record (conversion/budget.py): the budget, its measure on the analytic ledger with the
    fitted neurons' calibration spikes, and each site's chosen T."""

    kind: Literal["spikes_per_mac", "energy"]
    value: Annotated[float, Field(gt=0, le=MAX_SCALE)]
    seq_len: Positive
    measured: Measure
    target: str | None
    timesteps: dict[str, Timesteps]
    fisher: dict[str, Measure]
    spikes_per_activation: dict[str, Measure]


class ModelRecord(Record):
    source: Source
    rotation: Rotation | None
    weights: Weights | None = None
    prefix: Prefix | None
    coding: Coding
    sites: Annotated[dict[str, Site], AfterValidator(_some_sites)]
    calibration: Calibration
    conversion: Conversion
    budget: Budget | None = None  # per-site T under a global budget; absent without one

    @model_validator(mode="after")
    def _sites_agree(self):
        if self.budget is not None:
            if set(self.budget.timesteps) != set(self.sites):
                raise FieldError("budget.timesteps", "must name every spike site, and only those")
            for name, steps in self.budget.timesteps.items():
                if self.sites[name].timesteps != steps:
                    raise FieldError(f"sites.{name}.timesteps", f"is {self.sites[name].timesteps}, the budget "
                                                                f"allocated T={steps}")
        for name, site in self.sites.items():
            expected = "final_norm" if site.layer is None else f"layers.{site.layer}.{site.kind}"
            if name != expected or (site.layer is None) != (site.kind == "final_norm"):
                raise FieldError(f"sites.{name}", f"holds layer {site.layer} and kind {site.kind!r}, "
                                                  f"which is the site {expected}")
            if site.d.numel() != self.coding.grains:
                raise FieldError(f"sites.{name}.d", f"has {site.d.numel()} grains, coding.grains is "
                                                    f"{self.coding.grains}")
            if site.signed_digits != (self.coding.name in SIGNED_CODINGS):
                raise FieldError(f"sites.{name}.signed_digits", f"is {site.signed_digits}, but coding "
                                                                f"{self.coding.name!r} implies {not site.signed_digits}")
            if self.coding.name == "sdllm" and site.timesteps not in SDLLM_TIMESTEPS:
                raise FieldError(f"sites.{name}.timesteps", f"sdllm runs T in {SDLLM_TIMESTEPS}, "
                                                            f"got {site.timesteps}")
        return self


def record_fault(payload: dict) -> str | None:
    """`{field}: {what is wrong}` for the first fault of a model.pt record, None for a valid one."""
    return fault(ModelRecord, payload)


def fault(schema: type[BaseModel], data: Any) -> str | None:
    """`{field}: {what is wrong}, got {what came}` for the first fault of `data` against `schema`, else None."""
    try:
        schema.model_validate(data)
    except ValidationError as error:
        return _explain(error.errors()[0])
    return None


def _explain(error: dict) -> str:
    """One pydantic error as `field: message, got value`."""
    path = [str(part) for part in error["loc"]]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return f"{'.'.join([*path, cause.field])}: {cause}"
    field = ".".join(path) or "record"
    if error["type"] == "missing":
        return f"{field}: missing"
    if error["type"] == "extra_forbidden":
        return f"{field}: not part of the format"
    if isinstance(cause, ValueError):  # our own validators: the message already says what came
        return f"{field}: {cause}"
    message = re.sub(r" or instance of \w+", "", error["msg"].replace("Input should be", "must be"))
    return f"{field}: {message}, got {describe(error['input'])}"


def check_prefix_vocabulary(record: dict, vocabulary_size: int, where: str, source: str) -> None:
    """Every prefix token id is a row of the source model's embedding (known only once the model is loaded)."""
    for index, token in enumerate((record.get("prefix") or {}).get("token_ids", ())):
        if not 0 <= token < vocabulary_size:
            raise SpikecompileError(f"{where}: prefix.token_ids.{index}: token id {token} is outside the "
                                    f"vocabulary of {source} (ids 0..{vocabulary_size - 1}); re-convert the model")
