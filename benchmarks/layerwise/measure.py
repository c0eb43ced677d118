"""Timers and peak memory for the benchmark."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

from sparse_expansion.memory import CUDA, RSS, PeakMemory

from .config import STAGES


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return (isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in text
            or "can't allocate memory" in text)


class StageClock:
    """Seconds per stage, summed over repeated entries (the reference enters once per cluster)."""

    def __init__(self, device):
        self.device = device
        self.seconds = {s: 0.0 for s in STAGES}

    @contextmanager
    def __call__(self, stage: str):
        sync(self.device)
        t = time.perf_counter()
        yield
        sync(self.device)
        self.seconds[stage] += time.perf_counter() - t


@contextmanager
def peak_mib(device):
    """Yields a dict that gets, on exit, "extra_mb" (peak above the start) and "total_mb" (peak), in
    MiB: CUDA max allocated, or on CPU the kernel's peak RSS reset at the start (memory.PeakMemory
    with reset_rss; RSS includes allocator caching, so it bounds the tensors alive from above)."""
    out = {"extra_mb": None, "total_mb": None}
    key = CUDA if torch.device(device).type == "cuda" else RSS
    sync(device)
    with PeakMemory(device, reset_rss=True) as mem:
        yield out
        sync(device)
    if mem.peak.get(key) is not None and mem.above_start(key) is not None:
        out["total_mb"] = mem.peak[key] / 2 ** 20
        out["extra_mb"] = mem.above_start(key) / 2 ** 20


def time_calls(fns: dict, device, budget_s: float = 0.5, max_rounds: int = 30) -> dict:
    """Median milliseconds per call of each fn, measured in interleaved rounds (one timing of
    each fn per round) so that a busy machine slows them alike and their ratios stay fair. The
    first call (caches, compilation) is not counted; short calls are timed in groups so that the
    timer and the device sync do not dominate."""
    inner = {}
    for name, fn in fns.items():
        fn()
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        inner[name] = max(1, min(1000, int(2e-3 / max(time.perf_counter() - t, 1e-7))))
    runs = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(max_rounds):
        if r >= 3 and time.perf_counter() - start >= budget_s * len(fns):
            break
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync(device)
            runs[name].append((time.perf_counter() - t) / inner[name])
    return {name: statistics.median(v) * 1e3 for name, v in runs.items()}
