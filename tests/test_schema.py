"""The model.pt schema and the source-model boundary, through the real CLI: every bad file is one `error:` line
naming the file and the field, exit status 2, and the output path as it was."""

import copy
import json
import random
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import convert_tiny

from spikecompile import modelfile
from spikecompile.cli import cli
from spikecompile.errors import SpikecompileError
from spikecompile.modelschema import CODINGS, record_fault

SITE = "layers.1.silu"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tiny model converted with each coding (T=6, sdllm T=8 with 4-bit weights and membrane clipping)."""
    root = tmp_path_factory.mktemp("schema")
    paths = {}
    for coding in CODINGS:
        extra = ("-T", "8", "--weight-bits", "4", "--membrane-clip", "0.2") if coding == "sdllm" else ()
        paths[coding] = convert_tiny(root, coding, "--coding", coding, *extra)
    return root, paths


def _invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def _snapshot(path):
    """The bytes under path (a file or a folder), None if absent: what "unchanged" compares."""
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        return {str(item.relative_to(path)): item.read_bytes() for item in sorted(path.rglob("*")) if item.is_file()}
    return None


def assert_one_line_error(args, output, pattern):
    """Run the CLI: exit 2, one `error:` line matching pattern, output path untouched."""
    before = _snapshot(output)
    result = _invoke(*args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]
    assert _snapshot(output) == before
    return lines[0]


# --- every file the current code writes validates ---

def test_each_coding_model_validates(zoo):
    _, paths = zoo
    for coding, path in paths.items():
        record = modelfile.load(path)  # raises on any schema fault
        assert record["coding"]["name"] == coding and record_fault(record) is None


def test_save_refuses_a_record_outside_the_schema(zoo, tmp_path):
    record = torch.load(zoo[1]["phase"], weights_only=True)
    record["sites"][SITE]["timesteps"] = 40
    with pytest.raises(SpikecompileError, match=rf"sites\.{SITE}\.timesteps: must be in 4\.\.16.*nothing was written"):
        modelfile.save(record, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


# --- model.pt: a real converted record, modified, saved, given to build / eval / inspect ---

def _set(*path, value=None, delete=False):
    def mutate(record):
        *parents, last = path
        for key in parents:
            record = record[key]
        if delete:
            del record[last]
        else:
            record[last] = value
    return mutate


def _every_site(**fields):
    def mutate(record):
        for entry in record["sites"].values():
            entry.update(fields)
    return mutate


def _rename_site(record):
    record["sites"]["layers.9.q"] = record["sites"].pop("layers.0.q")


MODEL_CASES = {
    "tau as a string": (_set("sites", SITE, "tau", value="0.5"),
                        rf"sites\.{SITE}\.tau: must be a finite float32 scalar .*got the str '0\.5'"),
    "tau 1e300": (_set("sites", SITE, "tau", value=torch.tensor(1e300, dtype=torch.float64)),
                  rf"sites\.{SITE}\.tau: .*got a float64 tensor"),
    "tau inf": (_set("sites", SITE, "tau", value=torch.tensor(float("inf"))), rf"sites\.{SITE}\.tau: .*non-finite"),
    "tau eps": (_set("sites", SITE, "tau", value=torch.tensor(1e-30)), rf"sites\.{SITE}\.tau: .*got 1e-30"),
    "tau negative": (_set("sites", SITE, "tau", value=torch.tensor(-1.0)), rf"sites\.{SITE}\.tau: .*got -1"),
    "T=40 at every site": (_every_site(timesteps=40), r"sites\.layers\.0\.attn_norm\.timesteps: must be in 4\.\.16"),
    "timesteps against genotype": (_set("sites", SITE, "timesteps", value=8),
                                   rf"sites\.{SITE}\.genotype: has 6 steps, timesteps is 8"),
    "genotype skips a grain": (_set("sites", SITE, "genotype", value=torch.tensor([0, 0, 0, 2, 2, 2])),
                               rf"sites\.{SITE}\.genotype: must start at grain 0 and rise by 0 or 1"),
    "genotype as floats": (_set("sites", SITE, "genotype", value=torch.zeros(6)),
                           rf"sites\.{SITE}\.genotype: must be an int64 vector"),
    "d with a third grain": (_set("sites", SITE, "d", value=torch.tensor([2.0, 2.0, 2.0])),
                             rf"sites\.{SITE}\.d: has 3 grains, its genotype has 2"),
    "h NaN": (_set("sites", SITE, "h", value=torch.tensor([2.0, float("nan")])), rf"sites\.{SITE}\.h: .*non-finite"),
    "theta 0": (_set("sites", SITE, "theta", value=torch.tensor([2.0, 0.0])), rf"sites\.{SITE}\.theta: .*got 0"),
    "max_spikes negative": (_set("sites", SITE, "max_spikes", value=-1), rf"sites\.{SITE}\.max_spikes: .*got -1"),
    "max_spikes = T": (_set("sites", SITE, "max_spikes", value=6),
                       rf"sites\.{SITE}\.max_spikes: must be below timesteps = 6, got 6"),
    "v0 missing": (_set("sites", SITE, "v0", delete=True), rf"sites\.{SITE}\.v0: missing"),
    "site kind unknown": (_set("sites", SITE, "kind", value="mlp"), rf"sites\.{SITE}\.kind: must be .*got the str"),
    "site under another name": (_rename_site, r"sites\.layers\.9\.q: holds layer 0 and kind 'q'"),
    "site calibration mse inf": (_set("sites", SITE, "calibration", "mse", value=float("inf")),
                                 rf"sites\.{SITE}\.calibration\.mse: must be a finite number"),
    "no sites": (_set("sites", value={}), r"sites: must hold the spike sites"),
    "unknown coding": (_set("coding", "name", value="quantum"), r"coding\.name: must be 'phase', .*got the str"),
    "coding T as a string": (_set("coding", "timesteps", value="8"), r"coding\.timesteps: must be a valid integer"),
    "coding grains above T/2": (_set("coding", "grains", value=9), r"coding\.grains: must be in 1\.\.T/2"),
    "source without path/sha256": (_set("source", value={"kind": "hf_folder"}), r"source\.path: missing"),
    "source sha256 malformed": (_set("source", "sha256", value="abc"), r"source\.sha256: must be a sha256"),
    "source with an extra key": (_set("source", "mirror", value="x"), r"source\.mirror: not part of the format"),
    "prefix id negative": (_set("prefix", "token_ids", value=[-1]), r"prefix\.token_ids\.0: .*got -1"),
    "prefix eta NaN": (_set("prefix", "eta", value=float("nan")), r"prefix\.eta: must be a finite number"),
    "rotation seed as a string": (_set("rotation", "seed", value="0"), r"rotation\.seed: must be a valid integer"),
    "weights of 1 bit": (_set("weights", value={"method": "rtn", "bits": 1, "grid": "g", "linears": 14}),
                         r"weights\.bits: must be 4, 6 or 8, got 1"),
    "calibration windows 0": (_set("calibration", "windows", value=0), r"calibration\.windows: .*got 0"),
    "conversion missing": (_set("conversion", delete=True), r"conversion: missing"),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_file_is_one_line(zoo, tmp_path, case):
    mutate, pattern = MODEL_CASES[case]
    record = copy.deepcopy(torch.load(zoo[1]["phase"], weights_only=True))
    mutate(record)
    bad = tmp_path / "bad.pt"
    torch.save(record, bad)
    line = assert_one_line_error(["build", bad, "-o", tmp_path / "ir"], tmp_path / "ir", pattern)
    assert line.startswith(f"error: {bad}: ") and line.endswith("re-convert the model")


def test_sdllm_timesteps_outside_its_counts(zoo, tmp_path):
    record = torch.load(zoo[1]["sdllm"], weights_only=True)
    genotype = torch.zeros(6, dtype=torch.int64)
    for entry in record["sites"].values():
        entry.update(timesteps=6, genotype=genotype, max_spikes=5)
    torch.save(record, tmp_path / "bad.pt")
    assert_one_line_error(["build", tmp_path / "bad.pt", "-o", tmp_path / "ir"], tmp_path / "ir",
                          r"sites\.layers\.0\.attn_norm\.timesteps: sdllm runs T in \(4, 8, 16\), got 6")


@pytest.mark.parametrize("command", ["build", "eval"])
def test_prefix_token_outside_the_vocabulary(zoo, tmp_path, command):
    record = torch.load(zoo[1]["phase"], weights_only=True)
    record["prefix"]["token_ids"] = [1, 500]
    record["prefix"]["tokens"] = ["<s>", "?"]
    torch.save(record, tmp_path / "bad.pt")
    out = tmp_path / ("ir" if command == "build" else "eval.json")
    args = ["-o", out] if command == "build" else ["--ppl", zoo[0] / "calib.txt", "--json", out]
    assert_one_line_error([command, tmp_path / "bad.pt", *args], out,
                          r"bad\.pt: prefix\.token_ids\.1: token id 500 is outside the vocabulary of .*0\.\.127")


def test_eval_refuses_T40(zoo, tmp_path):
    record = torch.load(zoo[1]["phase"], weights_only=True)
    record["coding"]["timesteps"] = 40
    torch.save(record, tmp_path / "bad.pt")
    assert_one_line_error(["eval", tmp_path / "bad.pt", "--ppl", zoo[0] / "calib.txt", "--json", tmp_path / "e.json"],
                          tmp_path / "e.json", r"coding\.timesteps: must be in 4\.\.16 \(the supported T\), got 40")


def test_random_bytes_are_not_called_code(tmp_path):
    generator = random.Random(0)
    for index in range(20):
        data = generator.randbytes(generator.randrange(1, 4096))
        bad = tmp_path / f"r{index}.pt"
        bad.write_bytes(data)
        line = assert_one_line_error(["inspect", bad], tmp_path / "none", r"not a readable model\.pt")
        assert "pickled code" not in line


def test_pickled_code_is_still_called_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"format": modelfile.FORMAT, "evil": Payload()}, tmp_path / "evil.pt")
    assert_one_line_error(["inspect", tmp_path / "evil.pt"], tmp_path / "none", r"pickled code .*\(print\)")


def test_binary_overrides_file(zoo, tmp_path):
    overrides = tmp_path / "t.toml"
    overrides.write_bytes(bytes(range(256)))
    assert_one_line_error(["build", zoo[1]["phase"], "-o", tmp_path / "ir", "--overrides", overrides], tmp_path / "ir",
                          rf"{overrides}: not a TOML file of timestep overrides \(not UTF-8 text, at byte 128\)")


def test_overrides_file_value_names_the_file_and_site(zoo, tmp_path):
    overrides = tmp_path / "t.toml"
    overrides.write_text('[sites]\n"layers.0.q" = "x"\n')
    assert_one_line_error(["build", zoo[1]["phase"], "-o", tmp_path / "ir", "--overrides", overrides], tmp_path / "ir",
                          rf"{overrides}: sites\.layers\.0\.q: T='x' is outside 4\.\.16")


# --- the source model's files, read by convert ---

def _truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _missing_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _edit_config(**fields):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(fields)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _write(name, data):
    return lambda folder: (folder / name).write_bytes(data)


FOLDER_CASES = {
    "truncated safetensors": (_truncate, r"model\.safetensors: not a readable safetensors file "
                                         r"\(.*file not fully covered\).*download it again"),
    "safetensors header cut": (_write("model.safetensors", b"\x10\x00"), r"model\.safetensors: not a readable"),
    "safetensors of garbage": (_write("model.safetensors", b"\xff" * 512), r"model\.safetensors: .*header too large"),
    "index names a missing shard": (_missing_shard, r"model\.safetensors\.index\.json: weight_map\.lm_head\.weight: "
                                                    r"names the shard 'model-00002-of-00002\.safetensors', which is not"),
    "index not JSON": (lambda folder: (folder / "model.safetensors.index.json").write_text("{"),
                       r"model\.safetensors\.index\.json: the safetensors index is not valid JSON"),
    "config not JSON": (_write("config.json", b"{not json"), r"config\.json: the model config is not valid JSON"),
    "config a list": (_write("config.json", b"[1, 2]"), r"config\.json: the model config must be a JSON object"),
    "config binary": (_write("config.json", b"\xff\xfe\x00garbage"), r"config\.json: .*not UTF-8 text"),
    "config zero heads": (_edit_config(num_attention_heads=0), r"config\.json: num_attention_heads: .*got 0"),
    "config size as a string": (_edit_config(hidden_size="big"), r"config\.json: hidden_size: must be a valid integer"),
    "config heads do not divide": (_edit_config(num_key_value_heads=3),
                                   r"config\.json: num_key_value_heads: 3 does not divide num_attention_heads = 4"),
    "config model_type a list": (_edit_config(model_type=["llama"]), r"config\.json: architecture .* not supported"),
    "tokenizer damaged": (_write("tokenizer.json", b"{}"), r"could not load the tokenizer \(KeyError: 'added_tokens'\)"),
}


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_bad_source_folder_is_one_line(zoo, tmp_path, case):
    damage, pattern = FOLDER_CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(zoo[0] / "tiny", folder)
    damage(folder)
    output = tmp_path / "out.pt"
    output.write_bytes(b"the previous model")
    assert_one_line_error(["convert", folder, "-o", output, "--calib", zoo[0] / "calib.txt", "--no-progress"], output,
                          rf"{folder}.*{pattern}")


def _gguf(path, architecture="llama"):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GGUF_CASES = {
    "not a GGUF": (lambda path: path.write_bytes(b"hello world" * 10), r"not a readable GGUF file .*magic"),
    "truncated GGUF": (lambda path: path.write_bytes(_gguf(path).read_bytes()[:200]), r"not a readable GGUF file"),
    "GGUF without the model's metadata": (_gguf, r"could not load the (tokenizer|model) \("),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_bad_gguf_is_one_line(zoo, tmp_path, case):
    write, pattern = GGUF_CASES[case]
    path = tmp_path / "model.gguf"
    write(path)
    output = tmp_path / "out.pt"
    assert_one_line_error(["convert", path, "-o", output, "--calib", zoo[0] / "calib.txt", "--no-progress"], output,
                          rf"{path}: {pattern}")



def test_failed_gguf_load_prints_one_line_on_stderr(zoo, tmp_path):
    """In a real process: transformers' warnings about the damaged file are held back, the error is the only line."""
    path = _gguf(tmp_path / "model.gguf")
    output = tmp_path / "out.pt"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "spikecompile", "convert", str(path), "-o", str(output), "--calib",
                             str(zoo[0] / "calib.txt"), "--no-progress"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: could not load the tokenizer (ValueError: "), line
    assert not output.exists()
