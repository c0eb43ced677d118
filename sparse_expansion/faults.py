"""Fault injection for tests of resuming: SIGKILL this process at a named point."""
from __future__ import annotations

import os
import signal

KILL_ENV = "SPARSE_EXPANSION_KILL_AT"  # "block:K", "checkpoint:K", "pruned:K" or "save", then "@RANK" optionally


def fault_point(point: str) -> None:
    """SIGKILL this process here when $SPARSE_EXPANSION_KILL_AT names `point` (with "@R": only
    on the torchrun rank R)."""
    target, _, rank = os.environ.get(KILL_ENV, "").partition("@")
    if target == point and (not rank or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
