"""Where the float forward runs (`--device cpu|cuda|auto`) and in which dtype the source weights are held
(`--dtype float32|bfloat16|float16`). Neuron fitting and its statistics stay in float32 on the CPU: only the
model's weights and activations take the placement.

Every refusal comes before any weight is read: CUDA asked for where torch sees none, or a dtype the device
cannot run (probed with the operations a LLaMA forward needs).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpikecompileError

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "bfloat16", "float16")
"""torch dtype names (torch is imported where it is used: the CLI's --help stays instant)."""


@dataclass(frozen=True)
class Placement:
    """The resolved device (a torch device string: "cpu", "cuda") and dtype name (a key of DTYPES)."""

    device: str = "cpu"
    dtype: str = "float32"

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def is_default(self) -> bool:
        """float32 on the CPU: the path whose model.pt carries no placement record (as before the option)."""
        return self == Placement()


def resolve_placement(device: str = "cpu", dtype: str = "float32") -> Placement:
    """The Placement of `--device` and `--dtype`; SpikecompileError (one line, naming the option) when CUDA is
    asked for and absent, or when the device cannot run the dtype."""
    import torch

    if device not in DEVICES:
        raise SpikecompileError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if dtype not in DTYPES:
        raise SpikecompileError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if device == "cuda" and not torch.cuda.is_available():
        built = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise SpikecompileError(f"--device cuda: torch ({torch.__version__}, {built}) sees no CUDA device; use "
                                f"--device cpu, or --device auto to use CUDA only when present")
    resolved = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    problem = dtype_problem(resolved, getattr(torch, dtype))
    if problem:
        raise SpikecompileError(f"--dtype {dtype}: the {resolved} device cannot run it ({problem}); use "
                                f"--dtype float32")
    return Placement(resolved, dtype)


def part_memory_bytes(size: str | None) -> int | None:
    """`--part-memory` in bytes ("4GiB", "500MB", "2048"; None: no limit); SpikecompileError naming the option."""
    if size is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    text = size.strip()
    try:
        value = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except (ValueError, TypeError, AttributeError):
        value = None
    if value is None or value <= 0:
        raise SpikecompileError(f"--part-memory {size!r}: give a size such as 4GiB, 500MB or a number of bytes (> 0)")
    return value


NATIVE_CPU_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}
"""/proc/cpuinfo flags of the x86 instructions that multiply bf16 / fp16 matrices natively; without any of them
torch's CPU kernels widen each element in software (measured on an AVX2-only AMD EPYC: a 512 × 4096 by 4096 × 14336
bf16 linear took 2.8 s, the float32 one 0.47 s)."""


def slow_dtype_note(placement: Placement, cpu_flags: set[str] | None = None) -> str | None:
    """A one-line note when the placement's dtype has no native matrix product on this x86 CPU (None otherwise, and
    where /proc/cpuinfo does not say: another architecture, another OS). cpu_flags: the CPU's flags (default: read
    from /proc/cpuinfo)."""
    native = NATIVE_CPU_FLAGS.get(placement.dtype)
    if placement.device != "cpu" or native is None:
        return None
    flags = cpu_flags if cpu_flags is not None else set(cpu_info("flags").split())
    if not flags or "avx2" not in flags or any(flag in flags for flag in native):
        return None
    return (f"--dtype {placement.dtype}: this CPU has no {' or '.join(native)}, so its {placement.dtype} matrix "
            f"products are emulated, several times slower than float32; --dtype float32 is faster here (it holds "
            f"one layer's weights in float32: twice the memory)")


def cpu_info(field: str) -> str:
    """The first CPU's `field` in /proc/cpuinfo ("flags", "vendor_id", "model name"); "" where there is none (another
    OS, or an architecture that names its fields otherwise)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ""


def dtype_problem(device: str, dtype) -> str | None:
    """None when `device` runs a LLaMA forward's operations (matmul, softmax, rsqrt, SiLU, embedding) in
    `dtype` (a torch dtype), else what failed."""
    import torch

    if device == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16 support"
    try:
        x = torch.ones(4, 8, dtype=dtype, device=device)
        table = torch.nn.Embedding(4, 8).to(device=device, dtype=dtype)
        y = torch.nn.functional.silu(x @ x.T).softmax(-1) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
        y = y @ table(torch.arange(4, device=device))
        if not torch.isfinite(y.float()).all():
            return "non-finite results"
    except (RuntimeError, NotImplementedError, TypeError) as error:
        return str(error).strip().splitlines()[0]
    return None


def peak_memory_mb() -> dict:
    """Peak resident memory of this process (MB), and peak CUDA memory allocated by torch when CUDA is in use."""
    import torch

    peaks = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def peak_rss_mb() -> float:
    """This process's peak resident set (MB): the kernel's high-water mark of its own address space (VmHWM).

    Not getrusage's ru_maxrss: on Linux that survives exec, so a process started by a large one (a benchmark that
    has just written a model's weights, a test runner) reports its parent's peak as its own. VmHWM belongs to the
    address space that exec made. ru_maxrss only where /proc is absent (macOS: bytes, not KiB)."""
    import resource
    import sys

    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024
