"""Prefixed outlier tokens (PrefixQuant, docs/method.md §6): a fixed prefix whose full-precision KV cache is
prepended in every forward, so the massive activations of attention-sink tokens stay out of the spike sites.

Selection, on (the first two) calibration windows of the float model:
1. outlier tokens: where max|down_proj input| over the channels exceeds η·median (η = 64) in some layer.
   The first token of a window is one in most LLMs whatever it is (the attention sink), so position 0 is
   not counted; outlier tokens seen at least twice are kept, most frequent first.
2. the anchor, first in the prefix: among BOS, EOS, "\\n" and "." (single tokens), the one after which the
   windows have the fewest outlier tokens, then the lowest float NLL. (On SmolLM2 a chat token such as BOS
   raises the float perplexity of plain text by ~3 %, while "." absorbs the sink and changes it by < 0.1 %.)
The prefix is [anchor, frequent outlier tokens...] up to `max_tokens`. Its KV cache is computed once with
every site off; the K and V sites still see it (it is part of the keys and values they code), as in the
reference placement.

The selection depends only on the float model and the probe windows, not on the coding, T or budget, so a
conversion that differs from an earlier one only there reads the record the earlier one cached (SelectionCache)
instead of scanning again: on SmolLM2 the scan is a third of the conversion.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import torch

from ..errors import SpikecompileError
from ..files import atomic_write
from ..modelschema import Prefix, fault

OUTLIER_ETA = 64.0


def _anchor_candidates(tokenizer) -> list[int]:
    candidates = [tokenizer.bos_token_id, tokenizer.eos_token_id]
    for text in ("\n", "."):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        candidates.append(ids[0] if len(ids) == 1 else None)
    return list(dict.fromkeys(token for token in candidates if token not in (None, tokenizer.unk_token_id)))


@torch.inference_mode()
def _scan(model, windows, eta: float, prefix_ids: list[int] | None) -> tuple[list[torch.Tensor], float]:
    """Run the windows (after a prefix, if given); return per window its outlier-token mask, and the mean NLL."""
    peaks = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda module, inputs: peaks.append(inputs[0].detach().abs().amax(-1).flatten()))
        for layer in model.model.layers]
    cache = model(torch.tensor([prefix_ids], device=model.device), use_cache=True).cache if prefix_ids else None
    masks, nll = [], 0.0
    try:
        for ids in windows:
            peaks.clear()
            logits = model(ids, cache=copy.deepcopy(cache), use_cache=cache is not None).logits
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))
            masks.append(outlier_mask(peaks, eta))
    finally:
        for hook in hooks:
            hook.remove()
    return masks, nll / len(windows)


def outlier_mask(peaks: list[torch.Tensor], eta: float) -> torch.Tensor:
    """The outlier-token mask [tokens] of one window from its per-layer max|down_proj input| [tokens]."""
    per_layer = torch.stack(peaks)  # [layers, tokens]
    ratio = per_layer / per_layer.median(dim=-1, keepdim=True).values.clamp_min(1e-12)
    return (ratio > eta).any(0)


def select_prefix(model, tokenizer, windows: list[torch.Tensor], max_tokens: int = 4, eta: float = OUTLIER_ETA) -> dict:
    """Return the prefix record {token_ids, tokens, eta, outlier_counts, anchor_scores}; every site must be off."""
    probe = probe_windows(windows)
    scans = {anchor: _scan(model, probe, eta, None if anchor is None else [anchor])
             for anchor in [None, *anchor_candidates(tokenizer)]}
    return prefix_record(tokenizer, probe, scans, max_tokens, eta)


def probe_windows(windows: list[torch.Tensor]) -> list[torch.Tensor]:
    """The calibration windows the selection scans."""
    return windows[:2]


def anchor_candidates(tokenizer) -> list[int]:
    """The anchors tried, in order; SpikecompileError when the tokenizer has none."""
    candidates = _anchor_candidates(tokenizer)
    if not candidates:
        raise SpikecompileError("--prefix auto: the tokenizer has no BOS/EOS token and no single-token '\\n' or '.'")
    return candidates


def prefix_record(tokenizer, probe: list[torch.Tensor], scans: dict, max_tokens: int = 4,
                  eta: float = OUTLIER_ETA) -> dict:
    """The prefix record from the scans of the probe windows: scans[None] without a prefix, scans[anchor] after
    [anchor], each (per window its outlier-token mask, the mean NLL; scans[None]'s NLL is not read)."""
    counts: Counter = Counter()
    for ids, mask in zip(probe, scans[None][0], strict=True):
        counts.update(int(token) for token in ids[0][1:][mask[1:]])
    scores = {anchor: (int(sum(int(mask.sum()) for mask in masks)), nll)
              for anchor, (masks, nll) in scans.items() if anchor is not None}
    anchor = min(scores, key=lambda token: scores[token])
    frequent = [token for token, count in counts.most_common() if count >= 2 and token != anchor]
    token_ids = [anchor, *frequent[:max_tokens - 1]]
    return {"token_ids": token_ids, "tokens": [tokenizer.decode([token]) for token in token_ids], "eta": eta,
            "outlier_counts": {str(token): count for token, count in counts.most_common(16)},
            "anchor_scores": {tokenizer.decode([token]): {"outlier_tokens": count, "nll": nll}
                              for token, (count, nll) in scores.items()}}


class PrefixCache:
    """The prefix's full-precision KV cache; `forward(model, ids)` runs ids after it and returns their logits."""

    def __init__(self, model, sites, token_ids: list[int]):
        with sites.all_off(), torch.inference_mode():
            self.cache = model(torch.tensor([token_ids], device=model.device), use_cache=True).cache
        self.length = len(token_ids)

    def forward(self, model, ids: torch.Tensor) -> torch.Tensor:
        # Each call gets its own copy: the model appends the window's keys and values to the cache it is given.
        return model(ids, cache=copy.deepcopy(self.cache), use_cache=True).logits


class SelectionCache:
    """Prefix records cached by what the selection depends on: `fingerprint`, a JSON-able dict of everything that
    can change its numbers (the source's and tokenizer's sha256, the probe windows' ids, the rotation, weight bits,
    device, dtype, processor, library versions and the code itself; convert._selection_cache). The entry is
    <folder>/<sha256 of the fingerprint>.json, holding the fingerprint beside the record, and optionally a
    <same>.rows.safetensors of the rotated embedding's rows that the scan built ({token_ids, rows}: the calibration
    then need not build and rotate the whole embedding again), named with its sha256 in the JSON. A JSON file
    whose fingerprint differs, that is not JSON or whose record is not a valid prefix is a miss, never an error, and
    is written again; rows that fail their sha256 or shape are not used. One that cannot be written is one line on
    the log."""

    ROWS_LIMIT_BYTES = 256 << 20
    """Rows are cached up to this size (2048 tokens of a 8192-wide model in float32 are 64 MiB)."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        key = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()
        self.path = Path(folder) / f"{key}.json"
        self.rows_path = Path(folder) / f"{key}.rows.safetensors"

    def read(self, width: int | None = None, dtype: torch.dtype | None = None) -> tuple[dict | None, dict | None]:
        """(the cached record or None, its embedding rows {token_ids, rows} or None). width, dtype: what the rows
        must be (the model's hidden size and the placement's dtype)."""
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, None
        if not isinstance(document, dict) or document.get("fingerprint") != self.fingerprint:
            return None, None
        record = document.get("prefix")
        if not isinstance(record, dict) or fault(Prefix, record) is not None:
            return None, None
        return record, self._rows(document.get("rows_sha256"), width, dtype)

    def _rows(self, sha256, width: int | None, dtype: torch.dtype | None) -> dict | None:
        if not isinstance(sha256, str):
            return None
        try:
            data = self.rows_path.read_bytes()  # read once: hashed, then parsed
            if hashlib.sha256(data).hexdigest() != sha256:
                return None
            from safetensors.torch import load

            tensors = load(data)
        except (OSError, ValueError, RuntimeError):
            return None
        token_ids, rows = tensors.get("token_ids"), tensors.get("rows")
        if (token_ids is None or rows is None or token_ids.dtype != torch.int64 or token_ids.dim() != 1
                or rows.dim() != 2 or rows.shape[0] != token_ids.numel() or (width and rows.shape[1] != width)
                or (dtype and rows.dtype != dtype) or not bool((token_ids[1:] > token_ids[:-1]).all())):
            return None
        return {"token_ids": token_ids, "rows": rows}

    def write(self, record: dict, rows: dict | None = None) -> None:
        """Cache the record, and the embedding rows {token_ids (sorted), rows} when given and not too large."""
        document = {"fingerprint": self.fingerprint, "prefix": record}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if rows is not None and rows["rows"].numel() * rows["rows"].element_size() <= self.ROWS_LIMIT_BYTES:
                from safetensors.torch import save

                data = save({name: tensor.detach().cpu().contiguous() for name, tensor in rows.items()})
                atomic_write(self.rows_path, lambda temp: Path(temp).write_bytes(data))
                document["rows_sha256"] = hashlib.sha256(data).hexdigest()
            text = json.dumps(document, indent=1) + "\n"
            atomic_write(self.path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
        except (OSError, SpikecompileError) as error:  # an optimisation only: the next conversion scans again
            logging.getLogger("spikecompile").warning("prefix selection not cached: %s", error)
