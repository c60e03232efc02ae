"""The source digest's memo (loading._sha256): a digest remembered under the files' identities is read back while
no file has changed, and any change to a file's bytes, even one that keeps its size and restores its mtime, means
reading the bytes again."""

import hashlib
import json
import os

import pytest

from spikecompile import loading


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SPIKECOMPILE_CACHE", str(folder))
    return folder


def _files(folder, contents: dict) -> list:
    folder.mkdir(exist_ok=True)
    paths = []
    for name, data in contents.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def _plain_digest(paths) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _memos(cache):
    folder = cache / "source-digests"
    return sorted(folder.glob("*.json")) if folder.exists() else []


def test_a_remembered_digest_is_read_back_without_the_bytes(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(loading, "DIGEST_MEMO_MARGIN_NS", 0)
    paths = _files(tmp_path / "model", {"config.json": b"{}", "b.safetensors": b"x" * 5000})
    assert loading._sha256(paths) == _plain_digest(paths)
    [memo] = _memos(cache)
    document = json.loads(memo.read_text())
    assert document["sha256"] == _plain_digest(paths)
    # a digest only the memo knows: returned, so the bytes were not read again
    memo.write_text(json.dumps({**document, "sha256": "0" * 64}))
    assert loading._sha256(paths) == "0" * 64


def test_rewritten_bytes_of_the_same_size_and_mtime_are_read_again(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(loading, "DIGEST_MEMO_MARGIN_NS", 0)
    paths = _files(tmp_path / "model", {"config.json": b"{}", "w.safetensors": b"a" * 4096})
    before = loading._sha256(paths)
    mtime = paths[1].stat().st_mtime_ns
    paths[1].write_bytes(b"b" * 4096)
    os.utime(paths[1], ns=(mtime, mtime))  # size and mtime as before; ctime moves on
    after = loading._sha256(paths)
    assert after == _plain_digest(paths) != before


def test_files_changed_within_the_margin_are_not_remembered(tmp_path, cache):
    paths = _files(tmp_path / "model", {"config.json": b"{}"})
    assert loading._sha256(paths) == _plain_digest(paths)
    assert _memos(cache) == []  # written just now: its ctime is within DIGEST_MEMO_MARGIN_NS


def test_a_damaged_or_foreign_memo_is_ignored(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(loading, "DIGEST_MEMO_MARGIN_NS", 0)
    paths = _files(tmp_path / "model", {"config.json": b"{}", "w.safetensors": b"q" * 100})
    loading._sha256(paths)
    [memo] = _memos(cache)
    for damaged in ("not json", "[1, 2]", json.dumps({"identity": [], "sha256": "0" * 64}),
                    json.dumps({"identity": json.loads(memo.read_text())["identity"], "sha256": "xyz"})):
        memo.write_text(damaged)
        assert loading._sha256(paths) == _plain_digest(paths)


def test_no_memo_without_a_cache_or_in_an_unwritable_one(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "DIGEST_MEMO_MARGIN_NS", 0)
    paths = _files(tmp_path / "model", {"config.json": b"{}"})
    monkeypatch.setenv("SPIKECOMPILE_CACHE", "off")
    assert loading.digest_memo_folder() is None
    assert loading._sha256(paths) == _plain_digest(paths)
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    monkeypatch.setenv("SPIKECOMPILE_CACHE", str(blocker))  # its source-digests folder cannot be made
    assert loading._sha256(paths) == _plain_digest(paths)


def test_resolve_source_gives_the_same_digest_from_the_memo(tiny_llama_dir, cache, monkeypatch):
    monkeypatch.setattr(loading, "DIGEST_MEMO_MARGIN_NS", 0)
    first = loading.resolve_source(str(tiny_llama_dir))
    assert len(_memos(cache)) == 1
    assert loading.resolve_source(str(tiny_llama_dir)) == first
    monkeypatch.setenv("SPIKECOMPILE_CACHE", "off")
    assert loading.resolve_source(str(tiny_llama_dir)).sha256 == first.sha256


def test_a_cached_copy_file_rewritten_in_place_fails_its_manifest(tmp_path, cache, monkeypatch):
    """The dequantized-GGUF copy's files are checked against their manifest through the same memo: remembered
    while unchanged, read again (and refused) once rewritten, even with the same size and mtime."""
    monkeypatch.setattr(loading, "DIGEST_MEMO_MARGIN_NS", 0)
    source = loading.ModelSource("gguf", str(tmp_path / "m.gguf"), "ab" * 32)
    entry = tmp_path / "entry"
    [weights] = _files(entry, {loading.CACHE_WEIGHTS: b"w" * 2048})
    manifest = {"source_sha256": source.sha256, "source": source.path, "versions": loading._cache_versions(),
                "files": {weights.name: {"bytes": 2048, "sha256": hashlib.sha256(b"w" * 2048).hexdigest()}}}
    (entry / loading.CACHE_MANIFEST).write_text(json.dumps(manifest))
    assert loading.cached_copy_is_whole(entry, source)
    assert len(_memos(cache)) == 1 and loading.cached_copy_is_whole(entry, source)
    mtime = weights.stat().st_mtime_ns
    weights.write_bytes(b"v" * 2048)
    os.utime(weights, ns=(mtime, mtime))
    assert not loading.cached_copy_is_whole(entry, source)
