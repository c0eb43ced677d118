"""Fault injection for tests of resuming: SIGKILL this process at a named point."""
from __future__ import annotations

import os
import signal

KILL_ENV = "SPARSE_EXPANSION_KILL_AT"  # "block:K", "checkpoint:K" or "save"


def fault_point(point: str) -> None:
    """SIGKILL this process here when $SPARSE_EXPANSION_KILL_AT names `point`."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
