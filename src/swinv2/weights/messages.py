"""How the weights modules quote what a file holds in their one-line messages.

A refusal names the file, the key and the value it found; a value or a list of keys from a file can be
any size, so each is cut to a few dozen characters or a handful of names, the same way everywhere.
"""

from __future__ import annotations

from typing import Any


def shown(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: a file's content quoted in a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def abbreviate(keys: list[str], n: int = 6) -> str:
    """The first `n` of `keys`, comma-separated, and how many more there are."""
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def describe_error(e: BaseException) -> str:
    """``Type: message`` of an exception (the type alone where it has no message)."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
