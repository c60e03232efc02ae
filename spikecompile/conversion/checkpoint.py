"""The checkpoint of a streamed conversion: a folder beside model.pt (<output>.checkpoint) that `convert --resume`
continues from, removed once model.pt is written.

    checkpoint.json   what the conversion was started with: its options, source model (sha256), placement and
                      calibration text (sha256); --resume with anything else is refused before any weight is read
    prefix.json       the selected KV prefix (or null), once the prefix pass is done
    state.pt          after each calibrated layer: its index, every site sample so far, the rotation record so
                      far, and the hidden states of the prefix and the windows entering the next layer
    inputs.<i>.pt     with a per-site budget only: the hidden states of the prefix and the windows entering layer
                      i (i = the layer count: the final norm), which the budget's per-layer backward (the site
                      sensitivities, conversion.budget.site_fisher_part) runs each layer on again

Each file is written atomically (files.atomic_write), so an interruption leaves the last whole state. Under data
parallelism (spikecompile.parallel) only rank 0 writes it; every rank reads it to resume, and its state is the one
process's, so a conversion resumes with any number of processes.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SpikecompileError
from ..files import atomic_write, check_output_folder

FORMAT, FORMAT_VERSION = "spikecompile conversion checkpoint", 1
MANIFEST, PREFIX, STATE = "checkpoint.json", "prefix.json", "state.pt"


@dataclass
class Resumed:
    """What a checkpoint holds: prefix_known is False until the prefix pass has finished; state is None until
    the first layer is calibrated."""

    prefix_known: bool = False
    prefix: dict | None = None
    state: dict | None = None


class Checkpoint:
    """The checkpoint folder of the conversion writing `output`."""

    def __init__(self, output: str | Path, writes: bool = True):
        self.folder = check_output_folder(Path(f"{output}.checkpoint"), option="-o")
        self.active = False
        """whether this conversion started or resumed it (only then does remove() delete it)"""
        self.writes = writes
        """False: this process reads the checkpoint but never writes or removes it (a data-parallel rank other
        than 0)"""

    def start(self, manifest: dict) -> Resumed:
        """A fresh checkpoint (an old one in its place is dropped)."""
        if not self.writes:
            return Resumed()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir()
        self.active = True
        self._write_json(MANIFEST, {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest})
        return Resumed()

    def resume(self, manifest: dict) -> Resumed:
        """What the checkpoint holds; SpikecompileError (one line) when there is none or it was made with other
        options, another source or calibration text, or another spikecompile."""
        saved = self._read_json(MANIFEST, missing=f"--resume: no checkpoint at {self.folder} (nothing to resume); "
                                                  f"run convert without --resume")
        if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("format_version") != FORMAT_VERSION:
            raise SpikecompileError(f"--resume: {self.folder / MANIFEST} is not a checkpoint this spikecompile "
                                    f"reads; run convert without --resume to start over")
        difference = manifest_difference(saved, manifest)
        if difference:
            raise SpikecompileError(f"--resume: {self.folder} was made {difference}; resume with the same options, "
                                    f"or run convert without --resume to start over")
        resumed, self.active = Resumed(), self.writes
        if (self.folder / PREFIX).exists():
            resumed.prefix_known, resumed.prefix = True, self._read_json(PREFIX)
        if (self.folder / STATE).exists():
            try:
                resumed.state = torch.load(self.folder / STATE, weights_only=True, map_location="cpu")
            except Exception as error:  # written atomically: only a foreign or damaged file gets here
                raise SpikecompileError(f"--resume: {self.folder / STATE}: unreadable ({type(error).__name__}); run "
                                        f"convert without --resume to start over") from None
        return resumed

    def save_prefix(self, prefix: dict | None) -> None:
        self._write_json(PREFIX, prefix)

    def save_state(self, state: dict) -> None:
        if self.writes:
            atomic_write(self.folder / STATE, lambda temp: _torch_save(state, temp))

    def save_inputs(self, index: int, inputs: dict) -> None:
        atomic_write(self.folder / f"inputs.{index}.pt", lambda temp: _torch_save(inputs, temp))

    def load_inputs(self, index: int) -> dict:
        path = self.folder / f"inputs.{index}.pt"
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except Exception as error:  # written atomically by this conversion: only a foreign or damaged file gets here
            raise SpikecompileError(f"{path}: unreadable ({type(error).__name__}); run convert without --resume to "
                                    f"start over") from None

    def remove(self) -> None:
        """Delete the checkpoint this conversion started or resumed (another one in its place stays)."""
        if self.active:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _write_json(self, name: str, document) -> None:
        if not self.writes:
            return
        text = json.dumps(document, indent=1) + "\n"
        atomic_write(self.folder / name, lambda temp: Path(temp).write_text(text, encoding="utf-8"))

    def _read_json(self, name: str, missing: str | None = None):
        path = self.folder / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SpikecompileError(missing or f"--resume: {path} is missing; run convert without --resume") from None
        except (OSError, ValueError) as error:
            raise SpikecompileError(f"--resume: {path}: unreadable ({error}); run convert without --resume to start "
                                    f"over") from None


def _torch_save(state: dict, temp: str) -> None:
    """torch.save into memory, then written by Python: a full disk is an OSError (atomic_write's one line), not
    torch's zip writer's RuntimeError."""
    image = io.BytesIO()
    torch.save(state, image)
    Path(temp).write_bytes(image.getbuffer())


def manifest_difference(saved: dict, current: dict) -> str | None:
    """How the checkpoint's manifest differs from this conversion's, in the user's terms (the first difference:
    an option as its CLI flag), or None."""
    for name, value in current["options"].items():
        before = saved.get("options", {}).get(name)
        if before != value:
            return f"with --{name.replace('_', '-')} {_shown(before)}, not {_shown(value)}"
    for name, value in current["placement"].items():
        before = saved.get("placement", {}).get(name)
        if before != value:
            return f"with --{name} {_shown(before)}, not {_shown(value)}"
    if saved.get("source_sha256") != current["source_sha256"]:
        return f"from another source model ({saved.get('source')}, sha256 {str(saved.get('source_sha256'))[:12]}…)"
    if saved.get("calibration_sha256") != current["calibration_sha256"]:
        return "with another calibration text (--calib: its sha256 differs)"
    if saved.get("spikecompile") != current["spikecompile"]:
        return f"by spikecompile {saved.get('spikecompile')}, not {current['spikecompile']}"
    return None


def _shown(value) -> str:
    return "(not given)" if value is None else str(value)
