"""File helpers every layer shares: fail-early writability checks, atomic writes (a temporary sibling, then a
rename), sha256 of a file, and versioned JSON documents ({"format": ..., "format_version": ...})."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .errors import SpikecompileError


def check_writable(path: str | Path) -> Path:
    """Fail early (before any long computation) if `path` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise SpikecompileError(f"{path}: is a directory; give a file name such as {path / 'model.pt'}")
    if not parent.is_dir():
        raise SpikecompileError(f"{path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise SpikecompileError(f"{path}: the directory {parent} is not writable")
    return path


def atomic_write(path: str | Path, write) -> None:
    """Call write(temp_path) next to `path`, then rename: a failure never leaves a half-written file."""
    path = check_writable(path)
    try:
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise SpikecompileError(f"{path}: cannot write there ({error.strerror})") from None
    os.close(handle)
    try:
        write(temp)
        os.replace(temp, path)
    except OSError as error:
        Path(temp).unlink(missing_ok=True)
        raise SpikecompileError(f"{path}: writing failed ({error.strerror or error}); nothing was written") from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_document(path: str | Path, kind: str, format_name: str, version: int, remedy: str) -> dict:
    """A JSON file {"format": format_name, "format_version": version, ...} (a `kind`, e.g. "IR graph");
    one-line SpikecompileError naming the file otherwise, ending in `remedy` for another version."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise SpikecompileError(f"{path}: cannot read ({error.strerror})") from None
    except ValueError as error:
        raise SpikecompileError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != format_name:
        raise SpikecompileError(f"{path}: not a spikecompile {kind}")
    if document.get("format_version") != version:
        raise SpikecompileError(f"{path}: {kind} format version {document.get('format_version')}, this spikecompile "
                                f"reads version {version}; {remedy}")
    return document
