"""model.pt: the converted spiking model, format version 2.

A torch.save'd dict of plain data (str/int/float/bool/None, lists, dicts, tensors) — read back with
torch.load(weights_only=True) only, so loading never executes code from the file. It holds a reference to the
source model (not its weights: kind, path, sha256), the rotation record (re-applied deterministically from its
seed), and the spike-site table.

    format           "spikecompile.model"
    format_version   2 (1: before per-site v0 and max_spikes were read back)
    source           {kind: hf_folder|gguf|embedded, path, sha256}
    rotation         None, or rotation.rotate_llama's record {method, seed, residual, head, online, ...}
    weights          None, or conversion.weights' RTN record {method, bits, grid, linears} (re-applied on load)
    prefix           None, or the KV prefix (prefix.select_prefix): {token_ids, tokens, eta, outlier_counts}
    coding           {name: one of modelschema.CODINGS, timesteps: 4..16, grains: 1..T/2}
    sites            {site name: {layer: int|None, kind, timesteps: 4..16, genotype: int64[T],
                      tau: float32[], d/h/theta: float32[n], v0: float32[], max_spikes: int in 0..T-1,
                      calibration: {mse, base2_tau, base2_mse, lloyd_max_mse, lloyd_max_levels, max_abs},
                      samples: float32[N] (the stored calibration samples, for later re-fitting)}}
    calibration      {source, sha256, windows, seqlen, samples_per_site}
    conversion       {spikecompile, torch, transformers, seed, fit: {...}, options: {...}, created_utc}

Every field's type, range and agreement with the others is the schema of spikecompile.modelschema, checked when
the file is read (load) and before it is written (save).

`created_utc` follows the reproducible-builds convention: it is SOURCE_DATE_EPOCH when that is set, so the
same inputs, seed and SOURCE_DATE_EPOCH give a byte-identical file.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path

import torch

from .errors import SpikecompileError
from .files import atomic_write
from .modelschema import record_fault

FORMAT = "spikecompile.model"
FORMAT_VERSION = 2
REQUIRED_KEYS = ("source", "rotation", "prefix", "coding", "sites", "calibration", "conversion")


def save(record: dict, path: str | Path) -> None:
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **record}
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"model record lacks {missing}")
    _check_plain(payload, "record")
    fault = record_fault(payload)
    if fault:
        raise SpikecompileError(f"{path}: the converted model is outside the model.pt format ({fault}); "
                                f"nothing was written")
    atomic_write(path, lambda temp: _torch_save(payload, temp))


def _torch_save(payload: dict, temp: str) -> None:
    # Through a file object: torch.save names the zip records after a *path*'s stem, which would put the
    # random temp-file name into the bytes; a stream gets the fixed name "archive". In memory, then written by
    # Python: torch's zip writer turns a full disk into "RuntimeError: unexpected pos", Python into an OSError.
    image = io.BytesIO()
    torch.save(payload, image)
    Path(temp).write_bytes(image.getbuffer())


def load(path: str | Path) -> dict:
    """Read and validate a model.pt; every failure is a one-line SpikecompileError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SpikecompileError(f"{path}: no such model file")
    payload = _read_plain_data(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SpikecompileError(f"{path}: not a spikecompile model file")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise SpikecompileError(
            f"{path}: model format version {version}, this spikecompile reads version {FORMAT_VERSION}; "
            f"re-convert the model with this version"
        )
    fault = record_fault(payload)
    if fault:
        raise SpikecompileError(f"{path}: {fault}; re-convert the model")
    return payload


# What torch's weights-only unpickler says when a well-formed pickle names a global (a function or class to
# call): the file holds code or objects. Anything else it says means the bytes are no valid pickle at all.
_OBJECT_REFUSALS = re.compile(r"GLOBAL (\S+)|call reduce|create new object|Can only build")


def _read_plain_data(path: Path):
    """torch.load(weights_only=True): code in the file is refused, never run; foreign bytes are called that."""
    try:
        with warnings.catch_warnings():  # its pickle-protocol UserWarning would be a second line on stderr
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        refusal = _OBJECT_REFUSALS.search(str(error)) if _is_torch_container(path) else None
        if refusal:
            named = f" ({refusal.group(1)})" if refusal.group(1) else ""
            raise SpikecompileError(
                f"{path}: refused — the file contains pickled code or objects that are not plain data{named} "
                f"(model.pt files are loaded with weights_only=True); only load files you converted"
            ) from None
        raise SpikecompileError(f"{path}: not a readable model.pt (corrupt or not a torch file)") from None
    except Exception as error:  # torch.load raises anything from RuntimeError to IndexError on foreign bytes
        raise SpikecompileError(
            f"{path}: not a readable model.pt (truncated, corrupt or not a torch file: {_first_line(error)})"
        ) from None


def _is_torch_container(path: Path) -> bool:
    """A torch.save zip archive, or a legacy torch/pickle stream (it opens with the pickle PROTO opcode)."""
    with open(path, "rb") as stream:
        head = stream.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


PLAIN_TYPES = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(value, where: str) -> None:
    """Only plain data may go in (exact types: a str subclass such as TorchVersion would not load back)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) is not str:
                raise ValueError(f"{where}: key {key!r} is not a str")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif type(value) not in PLAIN_TYPES:
        raise ValueError(f"{where}: {type(value).__name__} is not plain data (torch.load(weights_only=True) refuses it)")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__
