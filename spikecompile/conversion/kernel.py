"""The phase neuron in one fused pass (inference only): a small C++ kernel, compiled once and cached.

conversion.neuron runs the neuron as T elementwise PyTorch steps (magnitude_spikes, then weighted_spike_sum),
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

The kernel is plain C++ (GCC vector extensions, OpenMP) built with the system compiler ($CXX or g++) into
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

from .neuron import PhaseNeuronParams, _fused, fire_heaviside, magnitude_spikes, step_schedule, weighted_spike_sum

MAX_STEPS = 64
"""The most steps the kernel runs (its per-step counters live on the stack)."""
CODE_DTYPES = ((8, torch.uint8), (15, torch.int16), (31, torch.int32))
"""Spike code dtype by T: bit t of an element's code is s_t."""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_STEPS 64

template <typename F, typename I, int L> struct Vec {
    typedef F f __attribute__((vector_size(sizeof(F) * L)));
    typedef I i __attribute__((vector_size(sizeof(I) * L)));
    typedef uint8_t b __attribute__((vector_size(L)));
};

template <typename F> struct Args {
    const F* x; int64_t sites, inner; int32_t T;
    const F* thr; const F* reset; const F* weight; const int64_t* budget;
    F* out; F* events; uint8_t* planes; void* code; int32_t code_bytes; uint8_t* popcount;
    int64_t* per_step; int64_t* rows; int64_t row_len; int32_t threads;
};

template <typename V, typename T> static inline void store(T* to, const V& v, int64_t len, int64_t full) {
    if (len == full) memcpy(to, &v, sizeof(V)); else if (len > 0) memcpy(to, &v, (size_t)len * sizeof(T));
}

// One thread's share: items begin..end, an item being U vectors of L elements (U·L elements of one site), so
// that U independent dependency chains (r: compare → subtract → compare ...) keep the core busy.
template <typename F, typename I, int L, int U>
static void fire_range(const Args<F>& a, int64_t begin, int64_t end) {
    typedef typename Vec<F, I, L>::f vf;
    typedef typename Vec<F, I, L>::i vi;
    typedef typename Vec<F, I, L>::b vb;
    const int64_t G = (int64_t)L * U;
    // every argument in a local, so that no store through an output pointer can force a reload
    const F* __restrict const xs = a.x;
    F* __restrict const out = a.out;
    F* __restrict const events = a.events;
    uint8_t* __restrict const planes = a.planes;
    uint8_t* __restrict const popcount = a.popcount;
    void* const codes = a.code;
    int64_t* const rows = a.rows;
    const int code_bytes = a.code_bytes;
    const int64_t inner = a.inner, per_site = (inner + G - 1) / G, n = a.sites * inner, row_len = a.row_len;
    const int T = a.T;
    vi totals[MAX_STEPS];
    int64_t row = -1, row_end = 0, row_sum = 0, row_chunks = 0;
    vi row_counts = vi{};
    vi lanes;
    for (int k = 0; k < L; ++k) lanes[k] = (I)k;
    const vf zero = vf{}, one = zero + (F)1;
    int64_t s = begin / per_site, j0 = (begin % per_site) * G;
    for (int t = 0; t < T; ++t) totals[t] = vi{};
    for (int64_t item = begin; item < end; ++item) {
        const F* __restrict thr = a.thr + s * T;
        const F* __restrict reset = a.reset + s * T;
        const F* __restrict weight = a.weight + s * T;
        const int64_t budget_raw = a.budget[s];
        const I budget = (I)(budget_raw <= 0 ? 0 : (budget_raw > T ? T + 1 : budget_raw));
        const int64_t len = inner - j0 < G ? inner - j0 : G;
        const int64_t g0 = s * inner + j0;
        int64_t lens[U];
        vf sign[U], r[U], acc[U];
        vi count[U], code[U], valid[U];
        #pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
            lens[u] = len - u * L > L ? L : (len - u * L > 0 ? len - u * L : 0);
            vf x = zero;
            if (lens[u] == L) memcpy(&x, xs + g0 + u * L, sizeof(vf));
            else if (lens[u] > 0) memcpy(&x, xs + g0 + u * L, (size_t)lens[u] * sizeof(F));
            valid[u] = lanes < (I)lens[u];
            sign[u] = ((zero < x) ? one : zero) - ((x < zero) ? one : zero);
            r[u] = x < zero ? -x : x;
            acc[u] = zero;
            count[u] = vi{};
            code[u] = vi{};
        }
        if (budget == 0 && len == G && !planes && !events && !codes) {  // the common case
            for (int t = 0; t < T; ++t) {
                const F th = thr[t], h = reset[t], d = weight[t];
                vi step = vi{};
                #pragma GCC unroll 8
                for (int u = 0; u < U; ++u) {
                    const vi fired = r[u] > th;
                    r[u] = fired ? r[u] - h : r[u];
                    acc[u] = fired ? acc[u] + d : acc[u];
                    count[u] -= fired;
                    step -= fired;
                }
                totals[t] += step;
            }
        } else {
            for (int t = 0; t < T; ++t) {
                const F th = thr[t], h = reset[t], d = weight[t];
                vi step = vi{};
                #pragma GCC unroll 8
                for (int u = 0; u < U; ++u) {
                    vi fired = r[u] > th;
                    if (budget) fired &= count[u] < budget;
                    if (len != G) fired &= valid[u];
                    r[u] = fired ? r[u] - h : r[u];
                    acc[u] = fired ? acc[u] + d : acc[u];
                    count[u] -= fired;
                    step -= fired;
                    if (codes) code[u] |= fired & (I)((I)1 << t);
                    if (planes) {
                        vb bits = __builtin_convertvector(fired & (I)1, vb);
                        store<vb, uint8_t>(planes + t * n + g0 + u * L, bits, lens[u], L);
                    }
                    if (events) {
                        vf y = (sign[u] * d) * (fired ? one : zero);
                        store<vf, F>(events + t * n + g0 + u * L, y, lens[u], L);
                    }
                }
                totals[t] += step;
            }
        }
        #pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
            const int64_t at = g0 + u * L;
            if (out) {
                vf o = sign[u] * acc[u];
                store<vf, F>(out + at, o, lens[u], L);
            }
            if (popcount) {
                vb bits = __builtin_convertvector(count[u], vb);
                store<vb, uint8_t>(popcount + at, bits, lens[u], L);
            }
            if (codes) {
                for (int64_t k = 0; k < lens[u]; ++k) {
                    const int64_t c = (int64_t)code[u][k];
                    if (code_bytes == 1) ((uint8_t*)codes)[at + k] = (uint8_t)c;
                    else if (code_bytes == 2) ((int16_t*)codes)[at + k] = (int16_t)c;
                    else ((int32_t*)codes)[at + k] = (int32_t)c;
                }
            }
            if (rows && lens[u] > 0) {
                if (row < 0) { row = at / row_len; row_end = (row + 1) * row_len; }
                if (at + lens[u] <= row_end && row_chunks < (1 << 20)) {  // the vector lies in the current row
                    row_counts += count[u];
                    ++row_chunks;
                } else {
                    for (int64_t k = 0; k < lens[u]; ++k) {
                        if (at + k >= row_end) {
                            for (int q = 0; q < L; ++q) row_sum += row_counts[q];
#pragma omp atomic
                            rows[row] += row_sum;
                            row = (at + k) / row_len; row_end = (row + 1) * row_len;
                            row_sum = 0; row_counts = vi{}; row_chunks = 0;
                        }
                        row_sum += count[u][k];
                    }
                }
            }
        }
        j0 += G;
        if (j0 >= inner || item + 1 == end) {  // the site's last item (or the range's): its step totals
            for (int t = 0; t < T; ++t) {
                int64_t sum = 0;
                for (int k = 0; k < L; ++k) sum += totals[t][k];
                totals[t] = vi{};
#pragma omp atomic
                a.per_step[s * T + t] += sum;
            }
            if (j0 >= inner) { ++s; j0 = 0; }
        }
    }
    if (row >= 0) {
        for (int q = 0; q < L; ++q) row_sum += row_counts[q];
#pragma omp atomic
        rows[row] += row_sum;
    }
}

template <typename F, typename I, int L, int U> static void fire(const Args<F> a) {
    const int64_t items = a.sites * ((a.inner + (int64_t)L * U - 1) / ((int64_t)L * U));
    const int threads = a.sites * a.inner < 65536 ? 1 : (a.threads > 0 ? a.threads : 1);
#pragma omp parallel num_threads(threads)
    {
        int64_t count = threads, id = 0;
#ifdef _OPENMP
        count = omp_get_num_threads(); id = omp_get_thread_num();
#endif
        const int64_t begin = items * id / count, end = items * (id + 1) / count;
        if (begin < end) fire_range<F, I, L, U>(a, begin, end);
    }
}

#define ENTRY(NAME, F, I, L, U)                                                                                         \
    extern "C" int NAME(const F* x, int64_t sites, int64_t inner, int32_t T, const F* thr, const F* reset,           \
                        const F* weight, const int64_t* budget, F* out, F* events, uint8_t* planes, void* code,      \
                        int32_t code_bytes, uint8_t* popcount, int64_t* per_step, int64_t* rows, int64_t row_len,    \
                        int32_t threads) {                                                                           \
        if (T < 1 || T > MAX_STEPS) return 1;                                                                        \
        Args<F> a = {x, sites, inner, T, thr, reset, weight, budget, out, events, planes, code, code_bytes,          \
                     popcount, per_step, rows, row_len, threads};                                                    \
        fire<F, I, L, U>(a);                                                                                            \
        return 0;                                                                                                    \
    }

ENTRY(spikecompile_fire_f32, float, int32_t, 16, 4)
ENTRY(spikecompile_fire_f64, double, int64_t, 8, 4)
"""

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
                parts = [part.to(dtype).reshape(sites, params.T).contiguous() for part in (params.thresholds(), h, d)]
                budget = params.max_spikes.reshape(sites).to(torch.int64).contiguous()
            self._schedules[dtype] = (*parts, budget)
        return self._schedules[dtype]


def prepare(params: PhaseNeuronParams | Prepared) -> Prepared:
    return params if isinstance(params, Prepared) else Prepared(params)


def quantize(x: Tensor, params: PhaseNeuronParams | Prepared) -> Tensor:
    """x̂ (phase_quantize with the Heaviside spike function), fused."""
    return fire(x, params).out


def fire(x: Tensor, neuron: PhaseNeuronParams | Prepared, *, out: bool = True, spikes: bool = False,
         events: bool = False, code: bool = False, popcount: bool = False, rows: bool = False) -> Fired:
    """Run the neuron on x (shape (*B, *rest) against the parameters' batch shape B) once; see the module
    docstring. neuron: the parameters, or prepare(parameters) to reuse their schedule across calls.

    out is in the reference's promoted dtype (x's and the parameters' float types); events in x's dtype with
    the weights d(t) cast to it (as the simulator's event rule computes them)."""
    prepared = neuron if isinstance(neuron, Prepared) else None
    params = prepared.params if prepared is not None else neuron
    batch = tuple(params.batch_shape)
    if tuple(x.shape[:len(batch)]) != batch:
        raise ValueError(f"neuron batch shape {batch} must be a prefix of the input shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"neuron input must be a float tensor, got {x.dtype}")
    if code:
        code_dtype(params.T)
    compute = torch.promote_types(x.dtype, params.tau.dtype)
    library = _library() if _kernel_fits(x, params, compute, events) else None
    if library is None:
        return _reference(x, params, out, spikes, events, code, popcount, rows)
    return _kernel(library, x, prepared or Prepared(params), compute, out, spikes, events, code, popcount, rows)


def _kernel_fits(x: Tensor, params: PhaseNeuronParams, compute: torch.dtype, events: bool) -> bool:
    return (compute in (torch.float32, torch.float64) and params.T <= MAX_STEPS and x.device.type == "cpu"
            and params.tau.device.type == "cpu" and _fused(x, params)
            and (not events or x.dtype == compute))


def _kernel(library, x, prepared: Prepared, compute, out, spikes, events, code, popcount, rows) -> Fired:
    params = prepared.params
    T, batch = params.T, tuple(params.batch_shape)
    result = Fired(per_step=torch.zeros(*batch, T, dtype=torch.int64))
    if out:
        result.out = torch.empty(x.shape, dtype=compute)
    if spikes:
        result.spikes = torch.empty((T, *x.shape), dtype=torch.bool)
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
        ctypes.c_int32(torch.get_num_threads()))
    if status != 0:
        raise RuntimeError(f"neuron kernel failed (status {status})")
    return result


def _pointer(tensor: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr() if tensor is not None else None)


def _reference(x, params, out, spikes, events, code, popcount, rows) -> Fired:
    """The same results from conversion.neuron's reference functions (eager PyTorch)."""
    magnitude = x.abs()
    planes = list(magnitude_spikes(magnitude, params, fire_heaviside))
    batch = len(params.batch_shape)
    dims = tuple(range(batch, x.dim()))
    per_step = torch.stack([plane.sum(dim=dims, dtype=torch.int64) if dims else plane.to(torch.int64)
                            for plane in planes], dim=-1)
    result = Fired(per_step=per_step)
    if out:
        result.out = torch.sign(x) * weighted_spike_sum(params, planes, magnitude)
    if not (spikes or events or code or popcount or rows):
        return result
    stacked = torch.stack(planes)
    if spikes:
        result.spikes = stacked.bool()
    if events:
        weights = step_schedule(params)[0].to(x.dtype).movedim(-1, 0)
        weights = weights.reshape(*weights.shape, *[1] * (x.dim() - batch))
        result.events = torch.sign(x).to(torch.int8).to(x.dtype) * weights * stacked.to(x.dtype)
    counts = stacked.sum(0, dtype=torch.int64)
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


def _load():
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler or not shutil.which(compiler):
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    attempts = [_FLAGS + _TUNE + _OPENMP, _FLAGS + _OPENMP, _FLAGS]
    failures = []
    for flags in attempts:
        key = hashlib.sha256("\0".join([SOURCE, *flags, version, platform.machine(), _cpu_signature()]).encode())
        path = _cache_dir() / f"neuron-{key.hexdigest()[:20]}.so"
        library = None
        if path.is_file():
            try:
                library = ctypes.CDLL(str(path))
            except OSError:  # a damaged cache entry: build it again
                path.unlink(missing_ok=True)
        if library is None:
            start = time.perf_counter()
            error = _build(compiler, flags, path)
            if error:
                failures.append(error)
                continue
            _state["compile_seconds"] = _state.get("compile_seconds", 0.0) + time.perf_counter() - start
            library = ctypes.CDLL(str(path))
        for name in ("spikecompile_fire_f32", "spikecompile_fire_f64"):
            getattr(library, name).restype = ctypes.c_int
        _state["path"] = path
        return library
    raise RuntimeError("building the kernel failed: " + " | ".join(failures)[-2000:])


def _build(compiler: str, flags: list[str], path: Path) -> str | None:
    """Compile SOURCE into `path` (atomically: concurrent builders each write a temp file); an error or None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        source = Path(work) / "neuron.cpp"
        source.write_text(SOURCE, encoding="utf-8")
        built = Path(work) / path.name
        done = subprocess.run([compiler, *flags, str(source), "-o", str(built)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            return f"{' '.join(flags)}: {done.stderr.strip()[-600:]}"
        os.replace(built, path)
    return None
