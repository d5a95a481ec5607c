"""The ``repwatch select`` sub-command's arguments, importable without torch.

``repwatch serve`` (the torch-free sidecar image) builds the whole command line; importing
:mod:`monitor.model_selection` there would load torch for nothing, so the ranking code is
imported only when ``select`` runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from monitor.cli.argtypes import torch_module

DESCRIPTION = ("Rank trained models / checkpoints without labels: RankMe and CKA centrality of "
               "their embeddings.")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``select`` to an ``argparse`` sub-parser set (``func`` loads torch only when run)."""
    p = subparsers.add_parser(
        "select", help="rank models/checkpoints by RankMe and CKA centrality (no labels)",
        description=DESCRIPTION)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="embedding dumps (.pt tensor or .npy, (n, d)), saved Monitor states "
                        "(.pt), or checkpoints holding a Monitor state under some key (e.g. "
                        "torch.save({'model': ..., 'repwatch': mon.state_dict()}, 'ckpt.pt'))")
    p.add_argument("--stream", default=None, help="stream to read from Monitor states")
    p.add_argument("--key", default=None, metavar="KEY",
                   help="where the Monitor state sits in a checkpoint holding several: the "
                        "keys leading to it joined by '/' (e.g. repwatch, or "
                        "callbacks/RepwatchCallback[run=exp1]/monitor); found by itself when "
                        "there is one")
    p.add_argument("--by", choices=("rankme", "centrality", "both"), default="both",
                   help="ranking criterion (default both: mean of the two ranks)")
    p.add_argument("--probe-rows", type=int, default=None, metavar="N",
                   help="use the first N rows of every input")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Import :mod:`monitor.model_selection` (needs torch) and run it; 2 with a message without
    torch."""
    select = torch_module("select", "monitor.model_selection")
    return 2 if select is None else int(select.run(args))
