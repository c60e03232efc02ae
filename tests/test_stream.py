"""The layer-sequential conversion: tiny models of each family saved as sharded safetensors (stream_cases.py) convert
to bit for bit the model.pt the in-memory conversion wrote (tests/data/stream_reference); an interrupted conversion
(a real SIGTERM to the CLI, or an interruption raised after layer k) resumes to the identical model.pt; --resume
against another conversion's checkpoint, a missing tensor and a damaged shard are one line before any weight read."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from stream_cases import (CASES, convert_arguments, convert_stopped_after_layer_0, host_kinds, reference_folder,
                          save_case)

from spikecompile.cli import cli
from spikecompile.conversion.convert import ConvertOptions, convert
from spikecompile.errors import Interrupted

ROOT = Path(__file__).resolve().parents[1]
IGNORED = {("source", "path"), ("calibration", "source"), ("options", "calib"), ("conversion", "created_utc")}
"""Where the files lay (a temporary folder of each run) and when: every other value of model.pt must be equal."""


def _differences(ours, theirs, path=()) -> list[str]:
    """Where two model.pt records differ (tensors bitwise, dtype included), but for IGNORED."""
    if path[-2:] in IGNORED:
        return []
    where = ".".join(map(str, path))
    if isinstance(ours, dict) and isinstance(theirs, dict):
        if set(ours) != set(theirs):
            return [f"{where}: keys {sorted(set(ours) ^ set(theirs))}"]
        return [found for key in ours for found in _differences(ours[key], theirs[key], (*path, key))]
    if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)) and len(ours) == len(theirs):
        return [found for index, pair in enumerate(zip(ours, theirs)) for found in _differences(*pair, (*path, index))]
    if isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor):
        same = ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(ours, theirs)
        return [] if same else [f"{where}: tensors differ"]
    return [] if ours == theirs else [f"{where}: {ours!r:.60} != {theirs!r:.60}"]


def _convert(arguments, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_conversion_gives_the_in_memory_model_pt(case, tmp_path, monkeypatch):
    references = reference_folder()
    if references is None:
        pytest.skip(f"no in-memory references were written on a host like this one ({' or '.join(host_kinds())}): "
                    f"the bits follow the host's float kernels; tests/stream_cases.py says how to write them")
    reference = torch.load(references / f"{case}.pt", weights_only=True)
    versions = {name: reference["conversion"][name] for name in ("torch", "transformers")}
    import transformers

    if versions != {"torch": str(torch.__version__), "transformers": transformers.__version__}:
        pytest.skip(f"the reference was written with {versions}: bitwise equality holds for the same libraries")
    folder, text = save_case(case, tmp_path)
    assert len(list(folder.glob("*.safetensors"))) > 3 and (folder / "model.safetensors.index.json").exists()
    output = tmp_path / "model.pt"
    _convert(convert_arguments(case, folder, text, output), monkeypatch)
    assert _differences(torch.load(output, weights_only=True), reference) == []
    assert not Path(f"{output}.checkpoint").exists()  # removed once model.pt is whole


def test_the_references_are_chosen_by_the_host_kind_most_specific_first():
    assert reference_folder(["GenuineIntel-avx512", "avx512"]).name == "avx512"
    assert reference_folder(["AuthenticAMD-avx2", "avx2"]).name == "AuthenticAMD-avx2"
    assert reference_folder(["AuthenticAMD-avx512", "avx512"]).name == "avx512"
    assert reference_folder(["GenuineIntel-avx2", "avx2"]) is None  # no set: the comparison skips, saying why
    assert all({path.name for path in reference_folder([kind]).glob("*.pt")} == {f"{case}.pt" for case in CASES}
               for kind in ("avx512", "AuthenticAMD-avx2"))
    assert host_kinds()[1] == torch.backends.cpu.get_cpu_capability().lower()


@pytest.fixture
def three_layers(tmp_path, monkeypatch):
    """The 3-layer tied LLaMA case and its uninterrupted model.pt bytes."""
    folder, text = save_case("llama_tied", tmp_path)
    whole = tmp_path / "whole" / "model.pt"  # the same file name: torch.save writes it into the archive
    whole.parent.mkdir()
    _convert(convert_arguments("llama_tied", folder, text, whole), monkeypatch)
    return folder, text, whole.read_bytes()


@pytest.mark.parametrize("resume_options", [(), ("--part-memory", "4KB")], ids=["as before", "with --part-memory"])
def test_resume_after_an_interruption_after_layer_0_gives_the_identical_model_pt(three_layers, tmp_path,
                                                                                 monkeypatch, resume_options):
    """--part-memory is where the weights wait, not an option of the model: a conversion stopped without it may
    resume with it (after an out-of-memory stop, the point of the option), to the same bytes."""
    folder, text, whole = three_layers
    output = tmp_path / "model.pt"
    convert_stopped_after_layer_0(folder, text, output)
    state = torch.load(Path(f"{output}.checkpoint") / "state.pt", weights_only=True)
    assert state["after_layer"] == 0 and len(state["names"]) == 9 and not output.exists()
    result = _convert([*convert_arguments("llama_tied", folder, text, output), "--resume", *resume_options],
                      monkeypatch)
    assert output.read_bytes() == whole, result.output
    assert not Path(f"{output}.checkpoint").exists()


def test_resume_after_a_real_sigterm_gives_the_identical_model_pt(three_layers, tmp_path):
    """The CLI as a subprocess, stopped (SIGSTOP) as soon as its first layer's checkpoint is there, sent SIGTERM."""
    folder, text, whole = three_layers
    output = tmp_path / "model.pt"
    state = Path(f"{output}.checkpoint") / "state.pt"
    env = {**os.environ, "SOURCE_DATE_EPOCH": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "spikecompile", *convert_arguments("llama_tied", folder, text, output)]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    process.send_signal(signal.SIGSTOP)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and "interrupted by SIGTERM" in stderr, stderr
    assert not output.exists() and state.exists()
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert output.read_bytes() == whole


@pytest.mark.parametrize("changed, message", [
    (("-T", "8"), "was made with --timesteps 6, not 8"),
    (("--seed", "3"), "was made with --seed 0, not 3"),
    (("--dtype", "bfloat16"), "was made with --dtype float32, not bfloat16"),
    (("--spike-penalty", "0.5"), "was made with --spike-penalty 0.0, not 0.5"),
])
def test_resume_with_other_options_is_refused_in_one_line(three_layers, tmp_path, changed, message):
    folder, text, _ = three_layers
    output = tmp_path / "model.pt"
    options = ConvertOptions(timesteps=6, grains=2, calib=str(text), calib_windows=2, calib_seqlen=64,
                             samples_per_site=512)

    def stop(index):
        raise Interrupted(signal.SIGTERM)

    with pytest.raises(Interrupted):
        convert(str(folder), str(output), options, progress=False, on_layer=stop)
    before = (Path(f"{output}.checkpoint") / "state.pt").read_bytes()
    result = CliRunner().invoke(cli, [*convert_arguments("llama_tied", folder, text, output), *changed, "--resume"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume: ") and message in lines[0], result.output
    assert (Path(f"{output}.checkpoint") / "state.pt").read_bytes() == before and not output.exists()


def test_budgeted_conversion_resumes_to_the_identical_model_pt_and_refuses_another_budget(tmp_path, monkeypatch):
    """A per-site budget keeps each layer's input hidden states in the checkpoint for its per-layer backward (the
    site sensitivities): interrupted after layer 0, resumed with another budget (refused, checkpoint kept), then
    with the same one, it writes the uninterrupted conversion's model.pt."""
    from spikecompile.budget import LedgerCost

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    folder, text = save_case("llama_tied", tmp_path)
    options = ConvertOptions(grains=2, calib=str(text), calib_windows=2, calib_seqlen=64, samples_per_site=512,
                             spikes_per_mac=2.5)
    whole = tmp_path / "whole" / "model.pt"
    whole.parent.mkdir()
    convert(str(folder), str(whole), options, progress=False, cost_model=LedgerCost)
    output = tmp_path / "model.pt"
    checkpoint = Path(f"{output}.checkpoint")

    def stop(index):
        if index == 0:
            raise Interrupted(signal.SIGTERM)

    with pytest.raises(Interrupted):
        convert(str(folder), str(output), options, progress=False, cost_model=LedgerCost, on_layer=stop)
    assert sorted(path.name for path in checkpoint.glob("inputs.*.pt")) == ["inputs.0.pt"]
    result = CliRunner().invoke(cli, ["convert", str(folder), "-o", str(output), "-n", "2", "--calib", str(text),
                                      "--calib-windows", "2", "--calib-seqlen", "64", "--samples-per-site", "512",
                                      "--no-progress", "--spikes-per-mac", "3", "--resume"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: --resume: ") and "with --spikes-per-mac 2.5, not 3.0" in result.output
    assert (checkpoint / "state.pt").exists() and not output.exists()
    convert(str(folder), str(output), options, progress=False, cost_model=LedgerCost, resume=True)
    assert output.read_bytes() == whole.read_bytes()
    record = torch.load(output, weights_only=True)
    assert len(set(record["budget"]["timesteps"].values())) >= 2 and not checkpoint.exists()


def test_resume_from_another_source_model_and_without_a_checkpoint(three_layers, tmp_path):
    folder, text, _ = three_layers
    output = tmp_path / "model.pt"
    result = CliRunner().invoke(cli, [*convert_arguments("llama_tied", folder, text, output), "--resume"])
    assert result.exit_code == 2 and "no checkpoint at" in result.output and len(result.output.splitlines()) == 1
    Path(f"{output}.checkpoint").mkdir()
    manifest = {"format": "spikecompile conversion checkpoint", "format_version": 1,
                "options": json.loads(json.dumps(ConvertOptions(timesteps=6, grains=2, calib=str(text),
                                                                calib_windows=2, calib_seqlen=64,
                                                                samples_per_site=512).__dict__)),
                "placement": {"device": "cpu", "dtype": "float32"}, "source": "elsewhere", "source_sha256": "0" * 64}
    (Path(f"{output}.checkpoint") / "checkpoint.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, [*convert_arguments("llama_tied", folder, text, output), "--resume"])
    assert result.exit_code == 2 and "from another source model (elsewhere" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_tensor_missing_from_the_shards_is_one_line_before_any_weight_is_read(tmp_path):
    folder, text = save_case("llama_untied_rtn", tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index_path.write_text(json.dumps(index))
    result = CliRunner().invoke(cli, convert_arguments("llama_untied_rtn", folder, text, tmp_path / "model.pt"))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "no tensor model.layers.1.mlp.up_proj.weight" in result.output, result.output
    assert not (tmp_path / "model.pt").exists()


def test_a_truncated_shard_is_one_line_before_any_weight_is_read(tmp_path):
    folder, text = save_case("llama_untied_rtn", tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-100])
    result = CliRunner().invoke(cli, convert_arguments("llama_untied_rtn", folder, text, tmp_path / "model.pt"))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert shard.name in result.output and "truncated" in result.output, result.output
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "model.pt.checkpoint").exists()


def test_the_embedding_is_built_and_rotated_once_and_its_kept_rows_are_its_own(tmp_path, monkeypatch):
    """The prefix pass keeps the rotated embedding's rows of every window token and anchor (EmbeddedRows), so the
    calibration pass does not build and rotate the whole embedding again; the rows are embedding(ids) bit for bit
    (model.pt itself is the reference's: test_streamed_conversion_gives_the_in_memory_model_pt)."""
    from spikecompile.conversion import convert as conversion
    from spikecompile.conversion.rotation import ResidualRotation

    rotated = []
    original = ResidualRotation.rotate_embedding
    monkeypatch.setattr(ResidualRotation, "rotate_embedding",
                        lambda self, embed, name: rotated.append(embed is not None) or original(self, embed, name))
    monkeypatch.setenv("SPIKECOMPILE_CACHE", "off")  # the prefix pass scans (a cached selection skips it)
    folder, text = save_case("llama_tied", tmp_path)
    _convert(convert_arguments("llama_tied", folder, text, tmp_path / "model.pt"), monkeypatch)
    assert rotated == [True, False]  # rotated by the prefix pass; the calibration pass only records it

    embedding = torch.nn.Embedding(50, 8)
    rows = conversion.EmbeddedRows(embedding, torch.tensor([7, 3, 3, 41, 0]))
    ids = torch.tensor([[41, 3, 0, 7, 7]])
    assert rows.covers(ids) and not rows.covers(torch.tensor([[3, 4]]))
    assert torch.equal(rows(ids), embedding(ids))
