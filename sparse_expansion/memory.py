"""Peak memory of a stretch of work: the CUDA allocator's peak on a GPU, and the process's
resident set size (RSS) sampled by a background thread (Linux /proc; None elsewhere)."""
from __future__ import annotations

import os
import threading

import torch

SAMPLE_SECONDS = 0.01


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then m.peak == {"peak_rss_bytes": ..., "peak_cuda_bytes": ...}
    (the latter only on CUDA). RSS is sampled every 10 ms, so a shorter spike can be missed."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak: dict = {}
        self._stop = threading.Event()
        self._rss = rss_bytes()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            now = rss_bytes()
            if now is not None:
                self._rss = max(self._rss or 0, now)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        now = rss_bytes()
        self.peak["peak_rss_bytes"] = None if now is None else max(self._rss or 0, now)
        if self.device.type == "cuda":
            self.peak["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(self.device)
