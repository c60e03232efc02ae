"""Target descriptions: the energy per operation the ledger prices (docs/method.md §7), read from a TOML or JSON file.

A target file holds `name`, `description` and a `constants` table; each constant is one table

    [constants.mac]
    value = 4.6          # a finite number > 0
    unit = "pJ"          # pJ, fJ, nJ or J (held in pJ after loading)
    bits = 32            # an integer ≥ 1: the width of the operation or access
    what = "..."         # optional: what one operation is
    source = "..."       # where the number comes from (a paper, a datasheet)
    status = "..."       # optional: measured, pre-silicon or estimate, as the source says

mac, ac, read and write (32-bit) are required. Optional:
* neuron: one neuron step (read v, compare with θ(t) and subtract h(t), write v); without it
  E_neuron = E_read + E_write + E_AC (see Target.neuron).
* mac_int8 and read_int8 (8-bit, both or neither): the int8 ANN baseline — one 8-bit × 8-bit multiply with its
  accumulate, one 8-bit operand read. With them the ledger prices an int8-ANN column beside the fp32 ANN.
* synop: one spike-driven synaptic operation on neuromorphic hardware (any width, priced per event); with it the
  SNN's spike-driven accumulates are priced at E_synop instead of E_AC.
Every fault is a one-line SpikecompileError naming the file and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import SpikecompileError
from .files import PACKAGE, packaged_target, parse_target, read_target_file

UNITS_IN_PJ = {"pJ": 1.0, "fJ": 1e-3, "nJ": 1e3, "J": 1e12}
REQUIRED_CONSTANTS = ("mac", "ac", "read", "write")
INT8_CONSTANTS = ("mac_int8", "read_int8")
OPTIONAL_CONSTANTS = ("neuron", "synop", *INT8_CONSTANTS)
CONSTANT_FIELDS = ("value", "unit", "bits", "what", "source", "status")
STATUSES = ("measured", "pre-silicon", "estimate")
"""What a constant's source is: a measurement of fabricated silicon, a pre-silicon simulation, or an estimate
(an energy model, or a figure borrowed from another technology)."""
SUFFIXES = (".toml", ".json")


@dataclass(frozen=True)
class Constant:
    """One energy constant: `pj` is the value in pJ; value and unit are as the file wrote them."""

    name: str
    pj: float
    value: float
    unit: str
    bits: int
    what: str
    source: str
    status: str = ""

    def to_dict(self) -> dict:
        entry = {"value": self.value, "unit": self.unit, "pJ": self.pj, "bits": self.bits, "what": self.what,
                 "source": self.source}
        return {**entry, "status": self.status} if self.status else entry


@dataclass(frozen=True)
class Target:
    """A loaded target: its constants (pJ plus metadata) and the file they came from."""

    name: str
    description: str
    file: str
    mac: Constant
    ac: Constant
    read: Constant
    write: Constant
    neuron_override: Constant | None = None
    synop: Constant | None = None
    mac_int8: Constant | None = None
    read_int8: Constant | None = None

    @property
    def has_int8(self) -> bool:
        """Whether the target prices the int8 ANN baseline (mac_int8 and read_int8 given)."""
        return self.mac_int8 is not None

    @property
    def neuron(self) -> Constant:
        """E_neuron per neuron step: the file's [constants.neuron], else E_read + E_write + E_AC
        (read the potential v, one 32-bit add-class op for compare-with-θ(t)/subtract-h(t), write v)."""
        if self.neuron_override is not None:
            return self.neuron_override
        pj = self.read.pj + self.write.pj + self.ac.pj
        return Constant("neuron", pj, pj, "pJ", self.read.bits, "one neuron step: read v, compare with θ(t) and "
                        "subtract h(t), write v", "derived: E_read + E_write + E_AC (spikecompile convention)")

    @property
    def constants(self) -> dict[str, Constant]:
        chosen = (self.mac, self.ac, self.read, self.write, self.neuron, self.synop, self.mac_int8, self.read_int8)
        return {constant.name: constant for constant in chosen if constant is not None}

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "file": self.file,
                "neuron_derived": self.neuron_override is None,
                "constants": {name: constant.to_dict() for name, constant in self.constants.items()}}


def load_target(name_or_path: str | Path) -> Target:
    """A target by packaged name ("cmos45nm": spikecompile.targets/cmos45nm.toml) or by file path."""
    label, text = _read(name_or_path)
    document = _parse(label, text)
    table = document.get("constants")
    if not isinstance(table, dict):
        raise SpikecompileError(f"{label}: constants table missing: give [constants.mac], [constants.ac], "
                                f"[constants.read] and [constants.write]")
    unknown = sorted(set(table) - set(REQUIRED_CONSTANTS) - set(OPTIONAL_CONSTANTS))
    if unknown:
        raise SpikecompileError(f"{label}: constants.{unknown[0]} unknown: the ledger prices "
                                f"{', '.join(REQUIRED_CONSTANTS + OPTIONAL_CONSTANTS)}")
    for name in REQUIRED_CONSTANTS:
        if name not in table:
            raise SpikecompileError(f"{label}: constants.{name} missing: add a [constants.{name}] table with "
                                    f"value, unit, bits and source")
    given_int8 = [name for name in INT8_CONSTANTS if name in table]
    if len(given_int8) == 1:
        missing = next(name for name in INT8_CONSTANTS if name not in table)
        raise SpikecompileError(f"{label}: constants.{missing} missing: the int8 ANN baseline needs both "
                                f"{' and '.join(INT8_CONSTANTS)}")
    constants = {name: _constant(label, name, entry) for name, entry in table.items()}
    fallback_name = Path(label).stem
    return Target(name=_text(document, "name", label, fallback_name), file=label,
                  description=_text(document, "description", label, ""),
                  neuron_override=constants.pop("neuron", None), **constants)


def packaged_targets() -> list[str]:
    """Names of the energy target files shipped in spikecompile.targets (those with a [constants] table; the
    hardware-limit files such as loihi2.toml are read by their own passes)."""
    folder = resources.files(PACKAGE)
    return sorted(entry.name.rsplit(".", 1)[0] for entry in folder.iterdir()
                  if entry.name.endswith(SUFFIXES) and "constants" in _parse(entry.name, entry.read_text("utf-8")))


def _read(name_or_path: str | Path) -> tuple[str, str]:
    """(label for errors, file text). A bare name (no folder, no suffix) that is not a file is a packaged one."""
    path = Path(name_or_path)
    if not path.exists() and path.name == str(name_or_path) and not path.suffix:
        return _read_packaged(str(name_or_path))
    if not path.is_file():
        raise SpikecompileError(f"{path}: no such target file (packaged targets: {', '.join(packaged_targets())})")
    if path.suffix not in SUFFIXES:
        raise SpikecompileError(f"{path}: a target file must be .toml or .json")
    return read_target_file(path, "the target file")


def _read_packaged(name: str) -> tuple[str, str]:
    for suffix in SUFFIXES:
        found = packaged_target(f"{name}{suffix}")
        if found is not None:
            return found
    raise SpikecompileError(f"target {name!r} unknown: give one of {', '.join(packaged_targets())} or a file path")


def _parse(label: str, text: str) -> dict:
    document = parse_target(label, text, "TOML" if label.endswith(".toml") else "JSON")
    if not isinstance(document, dict):
        raise SpikecompileError(f"{label}: the top level must be a table with a constants table")
    return document


def _constant(label: str, name: str, entry) -> Constant:
    """Validate constants.<name>: finite value > 0, a known unit, integer bits ≥ 1, a non-empty source."""
    field = f"constants.{name}"
    if not isinstance(entry, dict):
        raise SpikecompileError(f"{label}: {field} must be a table with value, unit, bits and source")
    unknown = sorted(set(entry) - set(CONSTANT_FIELDS))
    if unknown:
        raise SpikecompileError(f"{label}: {field}.{unknown[0]} unknown field: give {', '.join(CONSTANT_FIELDS)}")
    value = _required(label, field, entry, "value", "give the energy of one operation as a number")
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise SpikecompileError(f"{label}: {field}.value is {value!r}: give a finite number > 0")
    unit = _required(label, field, entry, "unit", "give pJ, fJ, nJ or J")
    if unit not in UNITS_IN_PJ:
        raise SpikecompileError(f"{label}: {field}.unit {unit!r} unknown: give pJ, fJ, nJ or J")
    bits = _required(label, field, entry, "bits", "give the operation's bit width, e.g. 32")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1:
        raise SpikecompileError(f"{label}: {field}.bits is {bits!r}: give an integer ≥ 1")
    source = _required(label, field, entry, "source", "say where the number comes from")
    if not isinstance(source, str) or not source.strip():
        raise SpikecompileError(f"{label}: {field}.source is empty: say where the number comes from")
    what = entry.get("what", "")
    if not isinstance(what, str):
        raise SpikecompileError(f"{label}: {field}.what must be a string")
    status = entry.get("status", "")
    if status and status not in STATUSES:
        raise SpikecompileError(f"{label}: {field}.status {status!r} unknown: give {', '.join(STATUSES)}")
    return Constant(name, float(value) * UNITS_IN_PJ[unit], float(value), unit, bits, what, source, status)


def _required(label: str, field: str, entry: dict, key: str, hint: str):
    if key not in entry:
        raise SpikecompileError(f"{label}: {field}.{key} missing: {hint}")
    return entry[key]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(document: dict, key: str, label: str, default: str) -> str:
    value = document.get(key, default)
    if not isinstance(value, str):
        raise SpikecompileError(f"{label}: {key} must be a string")
    return value
