"""argparse value types shared by the ``repwatch`` subcommands (torch-free)."""

from __future__ import annotations

import argparse
from typing import Any


def positive_int(text: str) -> int:
    """An int ≥ 1, or an argparse error naming what was given."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An int ≥ 0, or an argparse error naming what was given."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def torch_module(command: str, module: str) -> Any:
    """Import ``module`` (which needs torch) for ``repwatch command``; None after printing why
    when it cannot be imported (the torch-free sidecar image builds the whole command line)."""
    import importlib
    import sys

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        print(f"repwatch {command} needs torch: {exc}", file=sys.stderr)
        return None
