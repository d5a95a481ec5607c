"""argparse value types shared by the ``repwatch`` subcommands (torch-free)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An int ≥ 1, or an argparse error naming what was given."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
