"""Text sources for calibration and perplexity, and the standard windowing protocol.

`builtin` is text that exists on every CPython install: the documentation topics shipped in the standard
library (`pydoc_data.topics`, real English prose). Its first half is the default calibration text and its
second half the default evaluation text, so the two never overlap. Any other value is a path to a text file.

Perplexity protocol (GPTQ/QuaRot/SpikingLLM, ../shared/data/README.md): rows are `line + "\\n"` for
non-blank lines and "" for blank ones, joined with "\\n\\n", tokenized once, cut into non-overlapping windows
of `seqlen` tokens; the mean NLL over every predicted token is exponentiated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SpikecompileError

BUILTIN = "builtin"


@dataclass(frozen=True)
class TextSource:
    name: str  # "builtin:calib", "builtin:eval" or the file path as given
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _builtin_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(spec: str, split: str) -> TextSource:
    """Read a text file, or the `split` ("calib" or "eval") half of the builtin text."""
    if spec == BUILTIN:
        text = _builtin_text()
        half = len(text) // 2
        return TextSource(f"{BUILTIN}:{split}", text[:half] if split == "calib" else text[half:])
    path = Path(spec).expanduser()
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpikecompileError(f"{spec}: no such text file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SpikecompileError(f"{spec}: cannot read it as UTF-8 text ({error})") from None
    rows = [line + "\n" if line.strip() else "" for line in raw.splitlines()]
    return TextSource(str(spec), "\n\n".join(rows))


def token_windows(tokenizer, source: TextSource, seqlen: int, max_windows: int | None, purpose: str) -> list[torch.Tensor]:
    """Tokenize once and cut non-overlapping [1, seqlen] windows; fail if there is not even one."""
    if seqlen < 2:
        raise SpikecompileError(f"--seqlen {seqlen}: must be at least 2")
    ids = tokenizer(source.text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    count = ids.numel() // seqlen
    if count == 0:
        raise SpikecompileError(
            f"{source.name}: {purpose} text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
            f"give a longer text or a smaller seqlen"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return [ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0) for i in range(count)]
