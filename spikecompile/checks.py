"""Value checks shared by every layer: what counts as a count in a file, an option or an IR node's field."""

from __future__ import annotations


def is_count(value, minimum: int = 1) -> bool:
    """An int ≥ minimum, and not a bool (True is an int to Python, never a count to a file or an option)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
