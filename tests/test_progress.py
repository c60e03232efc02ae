"""Progress of `spikecompile build`'s long stages: the trace per decoder layer, the parts of the source read for
the prefix's KV cache and by the passes, and the ir, nir, onnx and lava exports per tensor, step, node or array file.

The CLI runs as a real subprocess whose stderr is a pseudo-terminal (the bars are drawn on a terminal only):
with --progress the bars are there, with one step per segment, node or layer; with --no-progress, or with stderr
a pipe, nothing is; the output folder is the same byte for byte either way (but the times in a JSON report).
"""

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import convert_tiny

from spikecompile.cli import cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
BAR_NAMES = ("trace", "prefix cache", "passes", "ir weights", "nir: lower", "nir: write", "onnx decoded: lower",
             "lava: lower", "lava: write")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A converted tiny model (2 decoder layers) for the module."""
    return convert_tiny(tmp_path_factory.mktemp("progress"))


def _in_terminal(arguments: list[str]) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal of 24 x 160 (tqdm draws nothing on a terminal of width 0);
    (exit status, all it wrote to stderr)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(leader, 1 << 16)
            except OSError:  # EIO: the terminal's other end is closed, the process is done
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        done = subprocess.run([sys.executable, "-m", "spikecompile", *arguments], stderr=follower,
                              stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=ENV, timeout=300)
    finally:
        os.close(follower)
        reader.join(timeout=30)
        os.close(leader)
    return done.returncode, b"".join(chunks).decode(errors="replace")


def _files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, object]:
    """Each file's bytes; a JSON report's content without its "seconds" (the time each stage took)."""
    return {str(path.relative_to(folder)): _untimed(json.loads(path.read_text())) if path.suffix == ".json"
            else path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file() and path.name not in skip}


def _untimed(document):
    if isinstance(document, dict):
        return {key: _untimed(value) for key, value in document.items() if key != "seconds"}
    if isinstance(document, list):
        return [_untimed(value) for value in document]
    return document


def _bars(stderr: str) -> list[str]:
    return [name for name in BAR_NAMES if f"{name}:" in stderr]


def test_nir_export_shows_each_stage_per_step_and_no_progress_shows_none(tiny_model, tmp_path):
    build = ["build", str(tiny_model), "--target", "nir"]
    status, shown = _in_terminal([*build, "-o", str(tmp_path / "shown")])
    assert status == 0, shown
    steps = len(json.loads((tmp_path / "shown" / "manifest.json").read_text())["steps"])
    assert _bars(shown) == ["trace", "prefix cache", "passes", "nir: lower", "nir: write"]
    assert "0/2 [" in shown.split("trace:")[1]  # one step per decoder layer of the tiny model
    for stage in ("prefix cache", "passes"):  # one step per part read from the source: 2 layers, embedding, head
        assert "0/4 [" in shown.split(f"{stage}:")[1]
    assert f"0/{steps} [" in shown.split("nir: write:")[1]  # one step per segment or manifest op
    status, silent = _in_terminal([*build, "-o", str(tmp_path / "silent"), "--no-progress"])
    assert status == 0, silent
    assert silent == ""
    piped = subprocess.run([sys.executable, "-m", "spikecompile", *build, "-o", str(tmp_path / "piped")],
                           capture_output=True, text=True, env=ENV, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""  # not a terminal: no bars, even with --progress (the default)
    assert _files(tmp_path / "shown") == _files(tmp_path / "silent") == _files(tmp_path / "piped")


@pytest.mark.parametrize(("target", "options", "expected", "unstamped"), [
    ("ir", (), ["trace", "prefix cache", "passes", "ir weights"], ()),
    ("onnx", ("--onnx-form", "decoded"), ["trace", "prefix cache", "passes", "onnx decoded: lower"], ()),
    # reference.npz is a zip archive whose entries carry the time they were written: compared by its arrays
    ("lava", ("--layers", "0"), ["trace", "prefix cache", "passes", "lava: lower", "lava: write"], ("reference.npz",)),
])
def test_export_progress_leaves_the_output_unchanged(tiny_model, tmp_path, target, options, expected, unstamped):
    status, shown = _in_terminal(["build", str(tiny_model), "--target", target, *options, "-o",
                                  str(tmp_path / "shown")])
    assert status == 0, shown
    assert _bars(shown) == expected
    result = CliRunner().invoke(cli, ["build", str(tiny_model), "--target", target, *options, "-o",
                                      str(tmp_path / "silent"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert _files(tmp_path / "shown", unstamped) == _files(tmp_path / "silent", unstamped)
    for name in unstamped:
        import numpy as np

        with np.load(tmp_path / "shown" / name) as first, np.load(tmp_path / "silent" / name) as second:
            assert sorted(first.files) == sorted(second.files)
            for key in first.files:
                np.testing.assert_array_equal(first[key], second[key])
