"""Data parallelism over the calibration windows (spikecompile.parallel): `torchrun -m spikecompile convert` with
several CPU processes joined by gloo writes the one process's model.pt, byte for byte, and resumes a one-process
checkpoint; what it cannot run is one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from conftest import requires_smollm2
from stream_cases import convert_arguments, convert_stopped_after_layer_0, save_case

from spikecompile.cli import cli
from spikecompile.conversion.convert import ConvertOptions, convert
from spikecompile.conversion.sites import SampleRecorder
from spikecompile.errors import SpikecompileError
from spikecompile.parallel import Ranks

ROOT = Path(__file__).resolve().parents[1]


@given(st.integers(1, 8), st.integers(0, 40))
def test_the_ranks_shares_are_contiguous_blocks_in_rank_order(world, extra):
    count = world + extra  # convert refuses fewer windows than processes
    shares = [Ranks(rank, world).share(count) for rank in range(world)]
    assert [k for share in shares for k in share] == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_recorder_that_skips_the_earlier_windows_draws_what_one_recorder_draws():
    windows = [torch.randn(3, 50, generator=torch.Generator().manual_seed(k)) for k in range(5)]
    one = SampleRecorder(16, seed=7)
    for x in windows:
        one.record("site", x)
    first, second = SampleRecorder(16, seed=7), SampleRecorder(16, seed=7, skipped_calls=2)
    for x in windows[:2]:
        first.record("site", x)
    for x in windows[2:]:
        second.record("site", x)
    assert torch.equal(torch.cat([first.samples(), second.samples()]), one.samples())


def _torchrun(processes: int, arguments: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "SOURCE_DATE_EPOCH": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "spikecompile", *arguments]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _one_process(arguments: list[str], monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case, processes, windows", [
    ("llama_tied", 2, 3),  # the prefix scan too; shares of 2 and 1 windows
    ("qwen2_bf16", 4, 5),  # q/k/v biases, bfloat16 weights; windows 2, 1, 1, 1; the three scans 1, 1, 1, 0
])
def test_processes_write_the_one_process_model_pt(case, processes, windows, tmp_path, monkeypatch):
    folder, text = save_case(case, tmp_path)
    arguments = [*convert_arguments(case, folder, text, tmp_path / "one.pt"), "--calib-windows", str(windows)]
    _one_process(arguments, monkeypatch)
    parallel = [*convert_arguments(case, folder, text, tmp_path / "many.pt"), "--calib-windows", str(windows)]
    result = _torchrun(processes, parallel)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # rank 0 reports
    assert (tmp_path / "many.pt").read_bytes() == (tmp_path / "one.pt").read_bytes()
    assert not Path(f"{tmp_path / 'many.pt'}.checkpoint").exists()


def test_a_conversion_stopped_in_one_process_resumes_in_two(tmp_path, monkeypatch):
    """The checkpoint holds every window's state, whoever wrote it: its state is the one process's."""
    folder, text = save_case("llama_tied", tmp_path)
    whole, output = tmp_path / "whole" / "model.pt", tmp_path / "model.pt"
    whole.parent.mkdir()
    _one_process(convert_arguments("llama_tied", folder, text, whole), monkeypatch)
    convert_stopped_after_layer_0(folder, text, output)
    result = _torchrun(2, [*convert_arguments("llama_tied", folder, text, output), "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert output.read_bytes() == whole.read_bytes()


def test_what_runs_in_one_process_is_refused_in_one_line(tmp_path, monkeypatch):
    folder, text = save_case("llama_tied", tmp_path)
    output = tmp_path / "model.pt"
    budget = ConvertOptions(grains=2, calib=str(text), calib_windows=2, calib_seqlen=64, spikes_per_mac=2.0)
    with pytest.raises(SpikecompileError, match="--spikes-per-mac with 2 processes: .* in one process"):
        convert(str(folder), str(output), budget, progress=False, ranks=Ranks(0, 2))
    few = ConvertOptions(grains=2, calib=str(text), calib_windows=2, calib_seqlen=64)
    with pytest.raises(SpikecompileError, match="--calib-windows: 2 calibration windows for 3 processes"):
        convert(str(folder), str(output), few, progress=False, ranks=Ranks(0, 3))
    assert not output.exists() and not Path(f"{output}.checkpoint").exists()

    monkeypatch.setenv("WORLD_SIZE", "2")
    inspect = CliRunner().invoke(cli, ["inspect", str(output)])
    assert inspect.exit_code == 2 and "only convert runs data-parallel" in inspect.output
    assert len(inspect.output.strip().splitlines()) == 1
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    started = CliRunner().invoke(cli, convert_arguments("llama_tied", folder, text, output))
    assert started.exit_code == 2 and "start the processes with torchrun" in started.output, started.output
    assert not output.exists()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL between them)")
def test_two_gpus_write_the_one_gpu_model_pt(tmp_path, monkeypatch):
    folder, text = save_case("llama_tied", tmp_path)
    cuda = ["--device", "cuda", "--calib-windows", "4"]
    _one_process([*convert_arguments("llama_tied", folder, text, tmp_path / "one.pt"), *cuda], monkeypatch)
    result = _torchrun(2, [*convert_arguments("llama_tied", folder, text, tmp_path / "two.pt"), *cuda])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "two.pt").read_bytes() == (tmp_path / "one.pt").read_bytes()


@pytest.mark.slow
@pytest.mark.smollm2
@requires_smollm2
def test_smollm2_in_two_processes_is_the_one_process_model(smollm2_t8_path, tmp_path):
    """The real model: its prefix scan (five scans over two ranks) and calibration (two windows, one each)."""
    from test_stream import _differences

    output = tmp_path / "model.pt"
    result = _torchrun(2, ["convert", "-o", str(output), "-T", "8", "--calib-windows", "2", "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _differences(torch.load(output, weights_only=True), torch.load(smollm2_t8_path, weights_only=True)) == []
