"""The prefix-selection cache (conversion.prefix.SelectionCache): a conversion that differs from an earlier one only
in what the selection does not depend on (coding, T, budget) reads the earlier one's prefix record and embedding
rows instead of scanning and rotating, and writes the same model.pt; anything the selection depends on, a damaged
or foreign entry, and an unwritable cache folder make it scan as before."""

import json
import logging

import pytest
import torch
from click.testing import CliRunner
from stream_cases import convert_arguments, save_case

from spikecompile.cli import cli
from spikecompile.conversion.prefix import SelectionCache

CASE = "llama_tied"  # 3 layers, hadamard rotation, prefix auto


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """This test's own cache folder (the session's is shared by every test)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SPIKECOMPILE_CACHE", str(folder))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    return folder


def _convert(tmp_path, name, *options):
    """Convert the case into tmp_path/name.pt; returns (model.pt's bytes, the --json report)."""
    folder, text = save_case(CASE, tmp_path)
    output, report = tmp_path / f"{name}.pt", tmp_path / f"{name}.json"
    arguments = [*convert_arguments(CASE, folder, text, output), "--json", str(report), *options]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    return output.read_bytes(), json.loads(report.read_text())


def _entries(cache):
    return sorted((cache / "prefix-selections").glob("*.json"))


@pytest.fixture
def rotations(monkeypatch):
    """Per embedding rotation, whether it was computed (True) or only recorded from kept rows (False)."""
    from spikecompile.conversion.rotation import ResidualRotation

    done, original = [], ResidualRotation.rotate_embedding
    monkeypatch.setattr(ResidualRotation, "rotate_embedding",
                        lambda self, embed, name: done.append(embed is not None) or original(self, embed, name))
    return done


def test_a_second_conversion_reads_the_selection_and_writes_the_same_model_pt(cache, tmp_path, monkeypatch):
    first, report = _convert(tmp_path, "first")
    assert not report["prefix_cached"] and len(report["prefix_layer_s"]) == 3
    assert len(_entries(cache)) == 1
    second, report = _convert(tmp_path, "second")
    assert report["prefix_cached"] and report["prefix_layer_s"] == []
    assert second == first
    monkeypatch.setenv("SPIKECOMPILE_CACHE", "off")  # and both equal the conversion without any cache
    uncached, report = _convert(tmp_path, "uncached")
    assert not report["prefix_cached"] and uncached == first


def test_the_embedding_rows_come_from_the_cache_too(cache, tmp_path, rotations):
    first, _ = _convert(tmp_path, "first")
    assert rotations == [True, False]  # the scan rotated it; the calibration used its rows
    assert len(list((cache / "prefix-selections").glob("*.rows.safetensors"))) == 1
    rotations.clear()
    second, report = _convert(tmp_path, "second")
    assert report["prefix_cached"] and rotations == [False] and second == first  # rows read back: no rotation
    [rows] = (cache / "prefix-selections").glob("*.rows.safetensors")
    rows.write_bytes(rows.read_bytes()[:-8] + bytes(8))  # damaged: the record is still read, the rows are not
    rotations.clear()
    third, report = _convert(tmp_path, "third")
    assert report["prefix_cached"] and rotations == [True] and third == first
    rotations.clear()
    _, report = _convert(tmp_path, "more", "--calib-windows", "4")  # the kept rows do not cover the new windows
    assert report["prefix_cached"] and rotations == [True]


def test_another_coding_and_t_reuse_the_selection(cache, tmp_path):
    _convert(tmp_path, "phase")
    _, report = _convert(tmp_path, "sd", "-T", "8", "--coding", "phase-sd")
    assert report["prefix_cached"]
    _, report = _convert(tmp_path, "more", "--calib-windows", "3")  # the probe is the same first two windows
    assert report["prefix_cached"] and len(_entries(cache)) == 1
    model = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert model["coding"]["name"] == "phase-sd" and model["coding"]["timesteps"] == 8
    assert model["prefix"] == torch.load(tmp_path / "phase.pt", weights_only=True)["prefix"]


@pytest.mark.parametrize("options", [("--seed", "1"), ("--rotate", "none"), ("--weight-bits", "8"),
                                     ("--calib-seqlen", "48")])
def test_what_the_selection_depends_on_makes_it_scan_again(cache, tmp_path, options):
    _convert(tmp_path, "first")
    _, report = _convert(tmp_path, "other", *options)
    assert not report["prefix_cached"] and len(_entries(cache)) == 2


def test_the_prefix_none_conversion_neither_reads_nor_writes_it(cache, tmp_path):
    _, report = _convert(tmp_path, "none", "--prefix", "none")
    assert not report["prefix_cached"] and _entries(cache) == []


@pytest.mark.parametrize("damage", ["truncated", "other fingerprint", "invalid record"])
def test_a_damaged_entry_is_a_miss_and_is_written_again(cache, tmp_path, damage):
    first, _ = _convert(tmp_path, "first")
    [entry] = _entries(cache)
    document = json.loads(entry.read_text())
    if damage == "truncated":
        entry.write_text(entry.read_text()[:40])
    elif damage == "other fingerprint":
        document["fingerprint"]["seed"] = 7
        entry.write_text(json.dumps(document))
    else:
        document["prefix"]["tokens"] = document["prefix"]["tokens"][:-1] + ["x", "y"]
        entry.write_text(json.dumps(document))
    again, report = _convert(tmp_path, "again")
    assert not report["prefix_cached"] and again == first
    assert json.loads(entry.read_text())["prefix"] == torch.load(tmp_path / "again.pt", weights_only=True)["prefix"]
    _, report = _convert(tmp_path, "third")
    assert report["prefix_cached"]


def test_an_unwritable_cache_folder_is_one_warning(cache, tmp_path, caplog):
    cache.mkdir()
    (cache / "prefix-selections").write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="spikecompile"):
        _, report = _convert(tmp_path, "first")
    assert not report["prefix_cached"]
    assert any("prefix selection not cached" in record.getMessage() for record in caplog.records)


def test_the_entry_name_is_the_fingerprint_s_hash(tmp_path):
    a = SelectionCache(tmp_path, {"seed": 0, "rotate": "hadamard"})
    b = SelectionCache(tmp_path, {"rotate": "hadamard", "seed": 0})
    c = SelectionCache(tmp_path, {"rotate": "hadamard", "seed": 1})
    assert a.path == b.path != c.path
    record = {"token_ids": [5], "tokens": ["."], "eta": 64.0, "outlier_counts": {},
              "anchor_scores": {".": {"outlier_tokens": 0, "nll": 2.5}}}
    rows = {"token_ids": torch.tensor([2, 5, 9]), "rows": torch.randn(3, 8, dtype=torch.bfloat16)}
    assert a.read() == (None, None)
    a.write(record, rows)
    read, kept = b.read(8, torch.bfloat16)
    assert read == record and kept.keys() == rows.keys()
    assert all(torch.equal(kept[name], rows[name]) and kept[name].dtype == rows[name].dtype for name in rows)
    assert b.read(16, torch.bfloat16) == (record, None) and b.read(8, torch.float32) == (record, None)
    assert c.read() == (None, None)
