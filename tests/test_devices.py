"""--device and --dtype: resolution and refusals before any weight is read, the float forward in the chosen
dtype with the neurons in fp32, and (with a GPU) the CUDA path."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from conftest import convert_tiny
from spikecompile.cli import cli
from spikecompile.devices import (DTYPES, Placement, dtype_problem, peak_memory_mb, resolve_placement,
                                  slow_dtype_note)
from spikecompile.errors import SpikecompileError

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine with no CUDA")


def test_default_placement_is_float32_on_the_cpu():
    placement = resolve_placement()
    assert placement == Placement("cpu", "float32") and placement.is_default
    assert placement.torch_dtype is torch.float32


def test_auto_is_cuda_exactly_when_torch_sees_one():
    assert resolve_placement("auto").device == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_maps_to_torch_and_runs_on_the_cpu(dtype):
    """torch 2.13's CPU runs a LLaMA forward's operations in float32, bfloat16 and float16 alike."""
    assert dtype_problem("cpu", getattr(torch, dtype)) is None
    assert resolve_placement("cpu", dtype).torch_dtype is getattr(torch, dtype)


def test_a_dtype_the_device_cannot_run_is_named():
    """An integer dtype has no matmul/softmax on any device: the probe says what failed."""
    assert dtype_problem("cpu", torch.int8)


@pytest.mark.parametrize("device, dtype, message", [
    ("tpu", "float32", "--device 'tpu': choose one of cpu, cuda, auto"),
    ("cpu", "float64", "--dtype 'float64': choose one of float32, bfloat16, float16"),
])
def test_unknown_device_or_dtype_is_refused(device, dtype, message):
    with pytest.raises(SpikecompileError, match=message):
        resolve_placement(device, dtype)


@without_cuda
@pytest.mark.parametrize("command", ["convert", "eval"])
def test_cuda_without_cuda_fails_before_any_file_is_read(tmp_path, command):
    """The model argument does not exist: the device error comes first, one line, exit 2, nothing written."""
    arguments = [command, str(tmp_path / "missing"), "--device", "cuda", "--json", str(tmp_path / "out.json")]
    if command == "convert":
        arguments += ["-o", str(tmp_path / "model.pt")]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: --device cuda: torch (")
    assert "sees no CUDA device; use --device cpu" in result.output
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_options():
    for command in ("convert", "eval"):
        text = CliRunner().invoke(cli, [command, "--help"]).output
        assert "--device [cpu|cuda|auto]" in text and "--dtype [float32|bfloat16|float16]" in text


def test_default_model_pt_has_no_placement_record(tmp_path):
    record = torch.load(convert_tiny(tmp_path), weights_only=True)
    assert "placement" not in record["conversion"]


def test_bfloat16_convert_and_eval_on_the_cpu(tmp_path, monkeypatch):
    """The float forward in bf16: the fit, the samples and model.pt stay fp32; eval reports placement and peak
    memory; the SNN/ANN ratio stays near 1 as in fp32."""
    monkeypatch.setenv("SPIKECOMPILE_CACHE", "off")  # the prefix pass scans (a cached selection skips it)
    model_pt = convert_tiny(tmp_path, "bf16", "--dtype", "bfloat16", "--json", tmp_path / "convert.json")
    record = torch.load(model_pt, weights_only=True)
    assert record["conversion"]["placement"] == {"device": "cpu", "dtype": "bfloat16"}
    site = next(iter(record["sites"].values()))
    assert site["samples"].dtype == torch.float32 and site["tau"].dtype == torch.float32
    report = json.loads((tmp_path / "convert.json").read_text())
    assert report["placement"] == {"device": "cpu", "dtype": "bfloat16"} and report["peak_rss_mb"] > 0
    assert len(report["layer_s"]) == len(report["prefix_layer_s"]) == report["layers"] > 0  # both streamed passes
    assert all(seconds > 0 for seconds in report["prefix_layer_s"])
    result = CliRunner().invoke(cli, ["eval", str(model_pt), "--ppl", str(tmp_path / "calib.txt"), "--seqlen", "64",
                                      "--max-windows", "2", "--no-progress", "--dtype", "bfloat16",
                                      "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["placement"] == {"device": "cpu", "dtype": "bfloat16"} and evaluation["peak_rss_mb"] > 0
    assert 0.8 < evaluation["ppl_ratio"] < 1.25


@pytest.mark.parametrize("dtype, flags, noted", [
    ("bfloat16", {"avx2"}, True),  # an AVX2-only x86 CPU (this project's AMD EPYC machines)
    ("bfloat16", {"avx2", "avx512f", "avx512_bf16"}, False),
    ("bfloat16", {"avx2", "amx_bf16"}, False),
    ("float16", {"avx2", "avx512_bf16"}, True),
    ("float16", {"avx2", "avx512_fp16"}, False),
    ("float32", {"avx2"}, False),
    ("bfloat16", set(), False),  # no /proc/cpuinfo flags (another OS or architecture): nothing is claimed
])
def test_an_emulated_dtype_on_the_cpu_gets_a_one_line_note(dtype, flags, noted):
    note = slow_dtype_note(Placement("cpu", dtype), flags)
    assert (note is not None) == noted
    if noted:
        assert note.startswith(f"--dtype {dtype}: this CPU has no ") and "--dtype float32" in note and "\n" not in note
    assert slow_dtype_note(Placement("cuda", dtype), flags) is None


def test_the_cli_prints_the_note_where_this_cpu_emulates_bfloat16(tmp_path):
    """On this machine's CPU, as its flags say: the note is on stderr exactly when slow_dtype_note gives one."""
    expected = slow_dtype_note(Placement("cpu", "bfloat16"))
    convert_tiny(tmp_path, "bf16", "--dtype", "bfloat16")
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "bf16.pt"), "--ppl", str(tmp_path / "calib.txt"),
                                      "--seqlen", "64", "--max-windows", "1", "--no-progress", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert (f"note: {expected}" in result.stderr) if expected else ("note:" not in result.stderr)


def test_eval_json_reports_peak_memory_in_float32(tmp_path):
    model_pt = convert_tiny(tmp_path)
    result = CliRunner().invoke(cli, ["eval", str(model_pt), "--ppl", str(tmp_path / "calib.txt"), "--seqlen", "64",
                                      "--max-windows", "1", "--no-progress", "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["placement"] == {"device": "cpu", "dtype": "float32"}
    assert evaluation["peak_rss_mb"] == pytest.approx(peak_memory_mb()["peak_rss_mb"], rel=0.5)



def test_a_child_process_reports_its_own_peak_not_its_parents():
    """getrusage's ru_maxrss survives exec: a convert started by a process that had just held a model's weights
    reported that process's peak as its own (the scale bench's "3 GB more on freshly written files")."""
    held = bytearray(1536 * 2**20)
    held[::4096] = b"\1" * len(held[::4096])  # touch every page: resident
    parent = peak_memory_mb()["peak_rss_mb"]
    del held
    probe = "from spikecompile.devices import peak_memory_mb; print(peak_memory_mb()['peak_rss_mb'])"
    child = float(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                 text=True).stdout)
    assert parent >= 1536 and 0 < child < parent - 1024

@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_and_eval_on_cuda(tmp_path, dtype):
    """The CUDA path: model.pt's tensors come back on the CPU; the report carries the peak GPU memory; eval runs."""
    model_pt = convert_tiny(tmp_path, dtype, "--device", "cuda", "--dtype", dtype, "--json", tmp_path / "c.json")
    record = torch.load(model_pt, weights_only=True)
    assert all(entry["samples"].device.type == "cpu" for entry in record["sites"].values())
    assert json.loads((tmp_path / "c.json").read_text())["peak_gpu_mb"] > 0
    result = CliRunner().invoke(cli, ["eval", str(model_pt), "--ppl", str(tmp_path / "calib.txt"), "--seqlen", "64",
                                      "--max-windows", "2", "--no-progress", "--device", "cuda", "--dtype", dtype,
                                      "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "e.json").read_text())
    assert evaluation["peak_gpu_mb"] > 0 and 0.8 < evaluation["ppl_ratio"] < 1.25


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_hadamard_kernel_agrees_with_the_torch_path(dtype, monkeypatch):
    """fast-hadamard-transform's CUDA kernel (used by apply_hadamard on CUDA) against the pure-torch butterfly."""
    pytest.importorskip("fast_hadamard_transform", reason="needs the fast-hadamard-transform CUDA package")
    from spikecompile import hadamard

    x = torch.randn(3, 7, 576, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
    kernel = hadamard.apply_hadamard(x)
    monkeypatch.setattr(hadamard, "_CUDA_KERNEL_DTYPES", ())  # the pure-torch path, same device and dtype
    reference = hadamard.apply_hadamard(x)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(kernel.float(), reference.float(), atol=tolerance, rtol=tolerance)
