"""Progress bars on stderr, for every long stage (convert's passes and fit, eval, build's load and trace, the exports).

A bar is drawn on stderr only when it is a terminal, where tqdm redraws it in place and clears it when done
(leave=False): a captured or redirected stderr holds the error line of a failed command and nothing else, as the
model load's bars do (loading.load_model). `--no-progress` turns them off on a terminal too.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def shown(progress: bool) -> bool:
    """Whether bars are drawn: asked for, and stderr is a terminal."""
    return bool(progress) and sys.stderr.isatty()


def bar(iterable: Iterable | None = None, *, desc: str, unit: str, progress: bool, total: int | None = None):
    """A tqdm bar over `iterable` (or a manual one of `total` steps) on stderr, drawn when shown(progress)."""
    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False, file=sys.stderr,
                disable=not shown(progress))
