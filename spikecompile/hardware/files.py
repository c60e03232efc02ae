"""Target files: the hardware descriptions shipped in spikecompile.targets (targets/*.toml) or given by path.

Both kinds of target read here: the energy targets (hardware.energy) and the Loihi 2 limits (hardware.loihi2).
Every fault is a one-line SpikecompileError that names the file.
"""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path

from ..errors import SpikecompileError

PACKAGE = "spikecompile.targets"  # the packaged target files (the repository's targets/ folder)


def packaged_target(filename: str) -> tuple[str, str] | None:
    """("targets/<filename>", its text) of a file spikecompile.targets ships; None where it ships none."""
    entry = resources.files(PACKAGE) / filename
    if not entry.is_file():
        return None
    return f"targets/{filename}", entry.read_text(encoding="utf-8")


def read_target_file(path: str | Path, what: str) -> tuple[str, str]:
    """(str(path), its text); "<path>: cannot read <what> (<reason>)" where it cannot be read."""
    try:
        return str(path), Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SpikecompileError(f"{path}: cannot read {what} ({getattr(error, 'strerror', error)})") from None


def parse_target(label: str, text: str, kind: str = "TOML") -> object:
    """The document of a target file's text, kind "TOML" or "JSON"; "<label>: not valid <kind> (<first line of
    the parser's message>)" where it is not."""
    try:
        return tomllib.loads(text) if kind == "TOML" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise SpikecompileError(f"{label}: not valid {kind} ({str(error).splitlines()[0]})") from None
