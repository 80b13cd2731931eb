"""What an error says to a user: one line, never an empty message."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The exception's first line of text, or its type name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
