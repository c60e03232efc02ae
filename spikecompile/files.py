"""File helpers every layer shares: fail-early writability checks, atomic writes of files and of whole folders (a
temporary sibling, then a rename; the mode a plain open() or mkdir() would give under the umask), sha256 of a file,
and versioned JSON documents ({"format": ..., "format_version": ...})."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import Interrupted, SpikecompileError

_interruptions: list[int] = []
"""The signals `interrupt` received. Once one has arrived nothing more is committed, even where Python swallowed its
exception (raised inside a __del__ or a weakref callback, as h5py's, it is only reported as ignored)."""


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
    temp = None
    try:
        with signals_held():  # an interruption comes once `temp` is known, so that it is removed below
            temp = _temporary_file(path)
        write(temp)
        os.chmod(temp, _file_mode(path))
        check_not_interrupted()
        os.replace(temp, path)
    except OSError as error:
        _remove(temp)
        raise SpikecompileError(f"{path}: writing failed ({error.strerror or error}); nothing was written") from None
    except BaseException:
        _remove(temp)
        raise


def _temporary_file(path: Path) -> str:
    try:
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise SpikecompileError(f"{path}: cannot write there ({error.strerror})") from None
    os.close(handle)
    return temp


def _remove(temp: str | None) -> None:
    if temp is not None:
        with signals_held():  # a second Ctrl-C does not leave the temporary file behind
            Path(temp).unlink(missing_ok=True)


def _file_mode(path: Path) -> int:
    """The mode of the file `path` replaces, or the one open() would give a new file (mkstemp's is 0600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status); elsewhere by setting it and back,
    which another thread creating a file at that instant could see."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_folder(path: str | Path, option: str = "-o", parents: bool = False) -> Path:
    """Fail early (before any long computation) if `path` cannot be written as a folder by atomic_folder (with
    `parents`, its missing parent folders may be created)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SpikecompileError(f"{option} {path}: exists and is not a folder; give a folder name")
    resolved = path.resolve()
    if resolved == Path.cwd() or resolved in Path.cwd().parents:
        raise SpikecompileError(f"{option} {path}: is the current folder or holds it; give a folder of its own, "
                                f"e.g. {option} out")
    if path.is_dir() and os.path.ismount(path):
        raise SpikecompileError(f"{option} {path}: is a mount point; give a folder inside it")
    parent = resolved.parent
    if not parents and not parent.is_dir():
        raise SpikecompileError(f"{option} {path}: the directory {path.parent} does not exist")
    if parent.is_dir() and not os.access(parent, os.W_OK):
        raise SpikecompileError(f"{option} {path}: the directory {parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_folder(path: str | Path, parents: bool = False) -> Iterator[Path]:
    """Write a folder whole or not at all: yields an empty temporary sibling (.NAME.<random>.tmp) to write into.

    When the block ends normally, the entries of an existing `path` that the block did not write are moved into the
    new folder (so, as when writing into a folder, only the files written are replaced) and it takes `path`'s
    place by renames, with SIGINT and SIGTERM held until done. On any exception (an interruption included) the
    temporary folder is removed and `path` is as it was; an OSError (ENOSPC...) becomes a one-line
    SpikecompileError naming `path`. parents: create missing parent folders first (they stay).
    """
    path = check_output_folder(path, parents=parents)
    temp = None
    try:
        with signals_held():  # an interruption comes once `temp` is known, so that it is removed below
            temp = _temporary_folder(path, parents)
        yield temp
        with signals_held():
            check_not_interrupted()
            _replace_folder(temp, path)
    except OSError as error:
        raise SpikecompileError(f"{path}: writing failed ({error.strerror or error}); nothing was written") from None
    except SpikecompileError as error:  # raised by a writer inside: name the target, not the temporary folder
        raise SpikecompileError(str(error).replace(str(temp), str(path)) if temp else str(error)) from None
    finally:
        if temp is not None:
            with signals_held():
                shutil.rmtree(temp, ignore_errors=True)  # already gone once it has replaced `path`


def _temporary_folder(path: Path, parents: bool) -> Path:
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as error:
        raise SpikecompileError(f"{path}: cannot create a folder there ({error.strerror}); nothing was "
                                "written") from None


def _replace_folder(new: Path, path: Path) -> None:
    """Put the finished folder `new` in `path`'s place, keeping the entries of an existing `path` it lacks; on an
    OSError every move is undone, so `path` is as it was."""
    if not path.exists():
        os.chmod(new, 0o777 & ~current_umask())  # mkdtemp's is 0700
        os.rename(new, path)
        return
    os.chmod(new, stat.S_IMODE(path.stat().st_mode))
    moved: list[tuple[Path, Path]] = []
    aside = new.with_suffix(".old")
    try:
        _carry_over(path, new, moved)
        os.rename(path, aside)
    except OSError:
        _undo(moved)
        raise
    try:
        os.rename(new, path)
    except OSError:
        os.rename(aside, path)
        _undo(moved)
        raise
    shutil.rmtree(aside, ignore_errors=True)  # only the entries `new` replaced are left in it


def _carry_over(old: Path, new: Path, moved: list[tuple[Path, Path]]) -> None:
    """Move each entry of `old` that `new` lacks into `new` (into folders both hold, recursively), recording it."""
    for entry in os.scandir(old):
        target = new / entry.name
        if not target.exists() and not target.is_symlink():
            os.rename(entry.path, target)
            moved.append((Path(entry.path), target))
        elif entry.is_dir(follow_symlinks=False) and target.is_dir() and not target.is_symlink():
            _carry_over(Path(entry.path), target, moved)


def _undo(moved: list[tuple[Path, Path]]) -> None:
    for source, target in reversed(moved):
        os.rename(target, source)


def interrupt(number: int, frame=None) -> None:
    """A SIGINT and SIGTERM handler (the CLI installs it): raise Interrupted, and refuse every later commit."""
    _interruptions.append(number)
    raise Interrupted(number)


def check_not_interrupted() -> None:
    """Raise Interrupted if `interrupt` has received a signal (whether or not its exception got through)."""
    if _interruptions:
        raise Interrupted(_interruptions[0])


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (a rename sequence or a clean-up is never cut in half), then
    go to the handlers they had. Only the main thread can do this (Python runs handlers there); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: caught.append(number))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)


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
    except RecursionError:
        raise SpikecompileError(f"{path}: not a spikecompile {kind} (JSON nested too deeply to read)") from None
    if not isinstance(document, dict) or document.get("format") != format_name:
        raise SpikecompileError(f"{path}: not a spikecompile {kind}")
    if document.get("format_version") != version:
        raise SpikecompileError(f"{path}: {kind} format version {document.get('format_version')}, this spikecompile "
                                f"reads version {version}; {remedy}")
    return document


def write_safetensors(path: str | Path, layout: dict[str, tuple[tuple[int, ...], object]], tensor_of) -> str:
    """Write a safetensors file one tensor at a time: layout {name: (shape, torch dtype)} first, in the header, then
    each tensor_of(name)'s bytes, read when its turn comes (a 7B model's weights are never in memory together).
    The file is byte for byte what safetensors.torch.save_file writes for the same tensors: the library itself
    orders the names (it is given empty tensors of the same dtypes), and the header is its compact JSON padded
    with spaces to 8 bytes. Returns the file's sha256, hashed as it is written. OSError on a failed write."""
    import safetensors.torch
    import torch

    probe = safetensors.torch.save({name: torch.empty(0, dtype=dtype) for name, (_, dtype) in layout.items()})
    probed = json.loads(probe[8:8 + int.from_bytes(probe[:8], "little")])
    order = [name for name in probed if name != "__metadata__"]
    header, offset = {}, 0
    for name in order:
        shape, dtype = layout[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": probed[name]["dtype"],
                        "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as stream:
        for block in (len(text).to_bytes(8, "little"), text):
            stream.write(block)
            digest.update(block)
        for name in order:
            shape, dtype = layout[name]
            tensor = tensor_of(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"tensor {name}: {tensor.dtype} {list(tensor.shape)} where the header has "
                                 f"{dtype} {list(shape)}")
            data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            stream.write(data)
            digest.update(data)
    return digest.hexdigest()
