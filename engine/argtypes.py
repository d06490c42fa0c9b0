"""argparse value types shared by the command modules (``--speed``, ``--pin``, counts)."""

from __future__ import annotations

import argparse

from replay.source import parse_speed

__all__ = ["speed", "pin", "non_negative_int"]


def speed(text: str):
    """``--speed``: ``max`` or a multiple of the recorded speed (:func:`replay.source.parse_speed`)."""
    try:
        return parse_speed(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pin(text: str) -> int | None:
    """``--pin``: a core number, or ``none``."""
    if text.lower() in ("none", "off", "-1"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pin takes a core number or 'none', got {text!r}") from None


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return v
