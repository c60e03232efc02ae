"""The phase neuron in one fused pass (inference only): a small C++ kernel, compiled once and cached.

neuron.reference runs the neuron as T elementwise PyTorch steps (magnitude_spikes, then weighted_spike_sum),
each a pass over memory. Here every element keeps its residual, output sum and spike count in registers
through all T steps, and one pass writes what the caller asks for:

    out       x̂ = σ·Σ_t d(t)·s_t                     (phase_quantize)
    spikes    bool [T, *x.shape], the planes s_t       (phase_encode)
    events    [T, *x.shape] y_t = (σ·d(t))·s_t         (the simulator's event-mode neuron output)
    code      bit t = s_t per element: uint8 for T ≤ 8, int16 for T ≤ 15, int32 for T ≤ 31
    popcount  uint8 Σ_t s_t per element
    rows      int64 Σ_t s_t summed over x's last dim: [*x.shape[:-1]]
    per_step  int64 [*B, T] spikes per site and step (always)

Bitwise equal to the reference: each step is the reference's float operations in the same order, one rounding
each — s_t = [r > θ'(t)] (∧ budget), r ← r − h(t) where s_t (torch.addcmul(r, h, s, value=-1): −h·s is exact),
acc ← acc + d(t) where s_t (addcmul from zeros), x̂ = sign(x)·acc with sign(x) = (0 < x) − (x < 0) as torch
computes it — in the dtype the reference's type promotion gives (x's and the parameters' promoted), compiled
with -ffp-contract=off and without fast-math. Integer counts make it deterministic under any thread split.

A signed-digit neuron (signed_digits) runs the same pass on r = x with its signed thresholds θ_sd(t): s_t =
[r > θ_sd(t)] − [−r > θ_sd(t)] (∧ budget, on nonzero digits), r ← r − h(t)·s_t, acc ← acc + d(t)·s_t, x̂ = acc
(σ = 1: each digit carries its sign); spikes are int8 digits −1/0/+1, every count counts nonzero digits, and a
bit code is refused (a digit is not a bit).

Late-spike masking (mask_steps = m, the paper's D.7) keeps only the spikes at steps < t0 + m, t0 the element's first
spike (reference.mask_late_spikes): the potential runs as without it (and a budget K counts the spikes it encoded),
but every output — x̂, planes, events, code and counts — sees only the kept spikes.

The kernel is plain C++ (GCC vector extensions as wide as the CPU's registers, OpenMP) built with the system compiler ($CXX or g++) into
$SPIKECOMPILE_KERNEL_CACHE (default ~/.cache/spikecompile/kernels), keyed by source, flags, compiler and CPU;
built once (about a second), then loaded. Without a compiler, or with SPIKECOMPILE_NO_KERNEL=1, fire() runs the
eager reference (one warning); the reference also runs wherever the kernel does not apply: autograd, non-CPU
tensors, T > 64, and dtypes other than float32/float64 after promotion.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .reference import (
    PhaseNeuronParams, fire_heaviside, magnitude_spikes, mask_late_spikes, signed_spikes, step_schedule,
    weighted_spike_sum,
)

MAX_STEPS = 64
"""The most steps the kernel runs (its per-step counters live on the stack)."""
CODE_DTYPES = ((8, torch.uint8), (15, torch.int16), (31, torch.int32))
"""Spike code dtype by T: bit t of an element's code is s_t."""

SOURCE_FILE = Path(__file__).with_name("kernel.cpp")
"""The kernel's C++ source, shipped as package data and compiled as it is (compiler errors name its lines)."""
SOURCE = SOURCE_FILE.read_text(encoding="utf-8")
"""The source this module's calls were written for, read at import: a kernel.cpp changed while a process runs (an
upgrade, an edit) must not give it a library whose entry points take other arguments."""

_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-std=c++17"]
_TUNE = ["-march=native"]
_OPENMP = ["-fopenmp"]
_lock = threading.Lock()
_state: dict = {}


@dataclass
class Fired:
    """What fire() computed (None where not asked for)."""

    per_step: Tensor
    """int64 [*B, T]: spikes per site and step"""
    out: Tensor | None = None
    spikes: Tensor | None = None
    events: Tensor | None = None
    code: Tensor | None = None
    popcount: Tensor | None = None
    rows: Tensor | None = None


def available() -> bool:
    """Whether the compiled kernel is in use (building it on first call)."""
    return _library() is not None


def compile_seconds() -> float:
    """Seconds this process spent building the kernel (0 when it was cached or not built)."""
    _library()
    return _state.get("compile_seconds", 0.0)


def library_path() -> Path | None:
    """The loaded kernel's shared library, None when fire() runs the eager reference."""
    _library()
    return _state.get("path")


def code_dtype(steps: int) -> torch.dtype:
    for most, dtype in CODE_DTYPES:
        if steps <= most:
            return dtype
    raise ValueError(f"spike codes hold at most {CODE_DTYPES[-1][0]} steps, got T = {steps}")


class Prepared:
    """A neuron's parameters with the kernel's schedule (θ'(t), h(t), d(t), K per site) kept per compute dtype:
    prepare once, fire many times (saves the schedule's small tensor ops on every call)."""

    def __init__(self, params: PhaseNeuronParams):
        self.params = params
        self._schedules: dict[torch.dtype, tuple[Tensor, ...]] = {}

    def schedule(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(thresholds, resets, weights) [sites, T] in dtype and budgets [sites] int64, all contiguous."""
        if dtype not in self._schedules:
            params = self.params
            sites = math.prod(params.batch_shape)
            with torch.no_grad():
                d, h, _ = step_schedule(params)
                thresholds = params.signed_thresholds() if params.signed_digits else params.thresholds()
                parts = [part.to(dtype).reshape(sites, params.T).contiguous() for part in (thresholds, h, d)]
                budget = params.max_spikes.reshape(sites).to(torch.int64).contiguous()
            self._schedules[dtype] = (*parts, budget)
        return self._schedules[dtype]


def prepare(params: PhaseNeuronParams | Prepared) -> Prepared:
    return params if isinstance(params, Prepared) else Prepared(params)


def quantize(x: Tensor, params: PhaseNeuronParams | Prepared) -> Tensor:
    """x̂ (phase_quantize with the Heaviside spike function), fused."""
    return fire(x, params).out


def fire(x: Tensor, neuron: PhaseNeuronParams | Prepared, *, out: bool = True, spikes: bool = False,
         events: bool = False, code: bool = False, popcount: bool = False, rows: bool = False,
         mask_steps: int | None = None) -> Fired:
    """Run the neuron on x (shape (*B, *rest) against the parameters' batch shape B) once; see the module
    docstring. neuron: the parameters, or prepare(parameters) to reuse their schedule across calls. mask_steps:
    late-spike masking (keep the spikes at steps < first spike + mask_steps), None for none.

    out is in the reference's promoted dtype (x's and the parameters' float types); events in x's dtype with
    the weights d(t) cast to it (as the simulator's event rule computes them)."""
    prepared = neuron if isinstance(neuron, Prepared) else None
    params = prepared.params if prepared is not None else neuron
    if params.signed_digits and code:
        raise ValueError("kernel.fire: a signed-digit neuron's spike train is no bit code (its digits are −1, 0, +1): "
                         "ask for spikes (int8 planes) instead of code")
    batch = tuple(params.batch_shape)
    if tuple(x.shape[:len(batch)]) != batch:
        raise ValueError(f"neuron batch shape {batch} must be a prefix of the input shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"neuron input must be a float tensor, got {x.dtype}")
    if code:
        code_dtype(params.T)
    if mask_steps is not None and mask_steps < 1:
        raise ValueError(f"kernel.fire: mask_steps must be at least 1, got {mask_steps}")
    compute = torch.promote_types(x.dtype, params.tau.dtype)
    library = _library() if _kernel_fits(x, params, compute, events) else None
    if library is None:
        return _reference(x, params, out, spikes, events, code, popcount, rows, mask_steps)
    return _kernel(library, x, prepared or Prepared(params), compute, out, spikes, events, code, popcount, rows,
                   mask_steps)


def applies(x: Tensor, params: PhaseNeuronParams) -> bool:
    """Whether the kernel may run the neuron: inference (no gradient can flow) on a float input."""
    if not x.is_floating_point():
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t.requires_grad for t in (x, params.tau, params.d, params.h, params.theta, params.v0))


def _kernel_fits(x: Tensor, params: PhaseNeuronParams, compute: torch.dtype, events: bool) -> bool:
    return (compute in (torch.float32, torch.float64) and params.T <= MAX_STEPS and x.device.type == "cpu"
            and params.tau.device.type == "cpu" and applies(x, params)
            and (not events or x.dtype == compute))


def _kernel(library, x, prepared: Prepared, compute, out, spikes, events, code, popcount, rows, mask_steps) -> Fired:
    params = prepared.params
    T, batch = params.T, tuple(params.batch_shape)
    result = Fired(per_step=torch.zeros(*batch, T, dtype=torch.int64))
    if out:
        result.out = torch.empty(x.shape, dtype=compute)
    if spikes:  # int8 digits −1, 0, +1 for a signed-digit neuron, else bool
        result.spikes = torch.empty((T, *x.shape), dtype=torch.int8 if params.signed_digits else torch.bool)
    if events:
        result.events = torch.empty((T, *x.shape), dtype=compute)
    if code:
        result.code = torch.empty(x.shape, dtype=code_dtype(T))
    if popcount:
        result.popcount = torch.empty(x.shape, dtype=torch.uint8)
    row_len = x.shape[-1] if x.dim() else 1
    if rows:
        result.rows = torch.zeros(x.shape[:-1] if x.dim() else (), dtype=torch.int64)
    n = x.numel()
    if n == 0:
        return result
    sites = math.prod(batch)
    *schedule, budget = prepared.schedule(compute)
    source = x.to(compute).contiguous()
    inner = n // sites
    pointer = _pointer
    status = getattr(library, "spikecompile_fire_f32" if compute == torch.float32 else "spikecompile_fire_f64")(
        pointer(source), ctypes.c_int64(sites), ctypes.c_int64(inner), ctypes.c_int32(T),
        pointer(schedule[0]), pointer(schedule[1]), pointer(schedule[2]), pointer(budget),
        pointer(result.out), pointer(result.events), pointer(result.spikes), pointer(result.code),
        ctypes.c_int32(result.code.element_size() if code else 0), pointer(result.popcount),
        pointer(result.per_step), pointer(result.rows), ctypes.c_int64(max(1, row_len)),
        ctypes.c_int32(torch.get_num_threads()), ctypes.c_int32(int(params.signed_digits)),
        ctypes.c_int32(mask_steps or 0))
    if status != 0:
        raise RuntimeError(f"neuron kernel failed (status {status})")
    return result


BUCKET_BITS = 16
"""fire_fixed's bucket table spans [−limit, limit] in at most 2^16 buckets (512 KiB of int64: it stays in L2)."""


def bucket_table(low: Tensor, limit: int) -> tuple[Tensor, int]:
    """(first, shift) for fire_fixed: bucket b holds u with (u + limit) >> shift = b, and first[b] (int64, one more
    than the buckets) is the interval of its first value, the last k with low[k] ≤ (b << shift) − limit."""
    shift = 0
    while (2 * limit) >> shift >= 1 << BUCKET_BITS:
        shift += 1
    starts = (torch.arange(((2 * limit) >> shift) + 2, dtype=torch.int64) << shift) - limit
    return (torch.searchsorted(low, starts.double(), right=True) - 1).clamp_(min=0), shift


def fire_fixed(x: Tensor, gain: Tensor | float, limit: int, low: Tensor, codes: Tensor, delta: float,
               intervals: bool = False, code_digits: Tensor | None = None, values: bool = True,
               buckets: tuple[Tensor, int] | None = None, in_place: bool = False
               ) -> tuple[Tensor | None, Tensor, Tensor | None, int] | None:
    """The Loihi 2 fixed-point neuron in one pass (passes.fixed_point._neuron): u = rint(x·gain) saturated to ±limit,
    k its interval in the firing table (low, codes), → (codes[k]·delta, codes[k], k if `intervals`, saturations).
    With code_digits (int8 [D, intervals]) the second item is instead the int8 digit planes code_digits[:, k]
    ([D, *x.shape]); without `values` the first is None (not computed). buckets: bucket_table(low, limit), made here
    when not given (a caller firing one site many times keeps it). in_place: write the values into x (float64,
    contiguous; each element is read before it is written), for a caller done with x. x float64 or int32 [...,
    inner], gain float64 [inner] or one number. None when the kernel is not available (the caller runs its torch
    path, bit for bit the same)."""
    library = _library()
    if library is None or x.dtype not in (torch.float64, torch.int32) or x.device.type != "cpu":
        return None
    source = x.contiguous()
    gains = torch.as_tensor(gain, dtype=torch.float64).reshape(-1).contiguous()
    inner = source.shape[-1] if source.dim() else 1
    in_place = in_place and values and source is x and x.dtype == torch.float64
    value = x if in_place else torch.empty(source.shape, dtype=torch.float64) if values else None
    if code_digits is None:
        code, digit_count, digit_table = torch.empty(source.shape, dtype=torch.float64), 0, None
    else:
        digit_table = code_digits.to(torch.int8).contiguous()
        digit_count = digit_table.shape[0]
        code = torch.empty((digit_count, *source.shape), dtype=torch.int8)
    interval = torch.empty(source.shape, dtype=torch.int64) if intervals else None
    saturated = ctypes.c_int64(0)
    low, codes = low.contiguous(), codes.contiguous()
    first, shift = buckets or bucket_table(low, limit)
    entry = library.spikecompile_fire_fixed if x.dtype == torch.float64 else library.spikecompile_fire_fixed_i32
    status = entry(
        _pointer(source), ctypes.c_int64(source.numel()), ctypes.c_int64(max(1, inner)), _pointer(gains),
        ctypes.c_int64(gains.numel()), ctypes.c_int64(limit), _pointer(low), _pointer(codes),
        ctypes.c_int64(low.numel()), _pointer(first), ctypes.c_int64(shift), ctypes.c_double(delta), _pointer(value),
        _pointer(None if digit_count else code),
        _pointer(interval), ctypes.byref(saturated), ctypes.c_int32(torch.get_num_threads()),
        ctypes.c_int64(digit_count), _pointer(digit_table), _pointer(code if digit_count else None))
    if status:
        raise ValueError(f"fire_fixed: the kernel refused its arguments (gain of {gains.numel()} for a last dim of "
                         f"{inner}, {low.numel()} intervals)")
    return value, code, interval, saturated.value


def _pointer(tensor: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr() if tensor is not None else None)


def _reference(x, params, out, spikes, events, code, popcount, rows, mask_steps=None) -> Fired:
    """The same results from the reference functions (neuron.reference, eager PyTorch)."""
    signed = params.signed_digits
    potential = x if signed else x.abs()  # the signed-digit potential keeps its sign
    planes = list(signed_spikes(x, params) if signed else magnitude_spikes(potential, params, fire_heaviside))
    if mask_steps is not None:
        planes = list(mask_late_spikes(torch.stack(planes), mask_steps))
    batch = len(params.batch_shape)
    dims = tuple(range(batch, x.dim()))
    per_step = torch.stack([(plane != 0).sum(dim=dims, dtype=torch.int64) if dims else (plane != 0).to(torch.int64)
                            for plane in planes], dim=-1)
    result = Fired(per_step=per_step)
    if out:
        total = weighted_spike_sum(params, planes, potential)
        result.out = total if signed else torch.sign(x) * total
    if not (spikes or events or code or popcount or rows):
        return result
    stacked = torch.stack(planes)
    if spikes:
        result.spikes = stacked.to(torch.int8) if signed else stacked.bool()
    if events:
        weights = step_schedule(params)[0].to(x.dtype).movedim(-1, 0)
        weights = weights.reshape(*weights.shape, *[1] * (x.dim() - batch))
        if signed:  # through the int8 digits, as the simulator: a masked −1 digit (−1·0 = −0.0) gives +0.0
            result.events = weights * stacked.to(torch.int8).to(x.dtype)
        else:
            result.events = torch.sign(x).to(torch.int8).to(x.dtype) * weights * stacked.to(x.dtype)
    counts = (stacked != 0).sum(0, dtype=torch.int64)
    if code:
        steps = torch.arange(params.T, dtype=torch.int64).reshape(-1, *[1] * x.dim())
        result.code = (stacked.to(torch.int64) << steps).sum(0).to(code_dtype(params.T))
    if popcount:
        result.popcount = counts.to(torch.uint8)
    if rows:
        result.rows = counts.sum(-1) if x.dim() else counts
    return result


def _library():
    """The loaded kernel (ctypes.CDLL), building it on first use; None (and one warning) when it cannot be."""
    with _lock:
        if "library" in _state:
            return _state["library"]
        library, reason = None, None
        if os.environ.get("SPIKECOMPILE_NO_KERNEL", "") not in ("", "0"):
            reason = "SPIKECOMPILE_NO_KERNEL is set"
        else:
            try:
                library = _load()
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                reason = str(error)
        if library is None:
            warnings.warn(f"spikecompile: the fused neuron kernel is not available ({reason}); running the eager "
                          f"reference neuron (slower, same results)", RuntimeWarning, stacklevel=3)
        _state["library"] = library
        return library


def _reset() -> None:
    """Forget the loaded kernel (tests)."""
    with _lock:
        _state.clear()


def _cache_dir() -> Path:
    if os.environ.get("SPIKECOMPILE_KERNEL_CACHE"):
        return Path(os.environ["SPIKECOMPILE_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spikecompile" / "kernels"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


ENTRY_POINTS = ("spikecompile_fire_f32", "spikecompile_fire_f64", "spikecompile_fire_fixed", "spikecompile_fire_fixed_i32")
"""The library's functions; each returns an int status."""


def _compiler() -> str:
    """The C++ compiler ($CXX, else g++ or c++); RuntimeError when there is none."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler or not shutil.which(compiler):
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    return compiler


def _open(path: Path) -> ctypes.CDLL:
    """The built library at `path`, loaded, its entry points declared to return int (OSError when it cannot load)."""
    library = ctypes.CDLL(str(path))
    for name in ENTRY_POINTS:
        getattr(library, name).restype = ctypes.c_int
    return library


def build_variant(path: Path, extra_flags: list[str]) -> ctypes.CDLL:
    """The kernel built as the package first tries to (-march=native, OpenMP) plus `extra_flags` (e.g.
    -DVECTOR_BYTES=16), into `path`, and loaded: for the tests and benchmarks that compare builds (put it in
    _state["library"] to run it). RuntimeError when it does not build."""
    error = _build(_compiler(), [*_FLAGS, *_TUNE, *_OPENMP, *extra_flags], path)
    if error:
        raise RuntimeError(f"building the kernel failed: {error}")
    return _open(path)


def _load():
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    attempts = [_FLAGS + _TUNE + _OPENMP, _FLAGS + _OPENMP, _FLAGS]
    failures = []
    for flags in attempts:
        key = hashlib.sha256("\0".join([SOURCE, *flags, version, platform.machine(), _cpu_signature()]).encode())
        path = _cache_dir() / f"neuron-{key.hexdigest()[:20]}.so"
        library = None
        if path.is_file():
            try:
                library = _open(path)
            except OSError:  # a damaged cache entry: build it again
                path.unlink(missing_ok=True)
        if library is None:
            start = time.perf_counter()
            error = _build(compiler, flags, path)
            if error:
                failures.append(error)
                continue
            _state["compile_seconds"] = _state.get("compile_seconds", 0.0) + time.perf_counter() - start
            library = _open(path)
        _state["path"] = path
        return library
    raise RuntimeError("building the kernel failed: " + " | ".join(failures)[-2000:])


def _build(compiler: str, flags: list[str], path: Path) -> str | None:
    """Compile SOURCE (as read at import, into a kernel.cpp of its own) into `path` (atomically: concurrent builders
    each write a temp file); an error or None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        built, source = Path(work) / path.name, Path(work) / SOURCE_FILE.name
        source.write_text(SOURCE, encoding="utf-8")
        done = subprocess.run([compiler, *flags, str(source), "-o", str(built)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            return f"{' '.join(flags)}: {done.stderr.strip()[-600:]}"
        os.replace(built, path)
    return None
