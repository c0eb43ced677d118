"""Peak memory of a stretch of work: the CUDA allocator's peak on a GPU, and the process's
resident set size (RSS) on Linux (/proc; None elsewhere).

By default the RSS is sampled by a background thread (the driver's per-block report). With
`reset_rss=True` the kernel's own high-water mark (VmHWM) is reset on entry through
/proc/self/clear_refs (Linux >= 4.0) and read on exit, so no spike is missed; glibc's cached
free memory is handed back first, so that the peak counts the section's own allocations
(benchmarks use this with `above_start`). Where the reset is impossible it falls back to sampling.
"""
from __future__ import annotations

import ctypes
import os
import threading

import torch

SAMPLE_SECONDS = 0.01
RSS, CUDA = "peak_rss_bytes", "peak_cuda_bytes"


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _proc_kib(path: str, key: str) -> int | None:
    """Bytes of a 'Key:  N kB' line of a /proc file (None where there is none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_high_water_bytes() -> int | None:
    """The kernel's peak RSS of this process (VmHWM) since start or the last `reset_rss_peak`."""
    return _proc_kib("/proc/self/status", "VmHWM")


def available_host_bytes() -> int | None:
    """The host memory available to new allocations (MemAvailable; None off Linux)."""
    return _proc_kib("/proc/meminfo", "MemAvailable")


def free_device_bytes(device: torch.device | str) -> int:
    """What a CUDA device can still give this process: the driver's free memory plus what
    PyTorch's caching allocator holds reserved but unused (mem_get_info counts that as used, so
    from the second block on a budget from it alone shrinks by the cache)."""
    device = torch.device(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + max(0, cached)


def trim_malloc() -> None:
    """Give glibc's cached free memory back to the OS (no-op without glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (writes 5 to /proc/self/clear_refs); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return rss_high_water_bytes() is not None
    except OSError:
        return False


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then m.peak == {"peak_rss_bytes": ..., "peak_cuda_bytes": ...}
    (the latter only on CUDA), and m.start the same keys at entry. Sampled RSS is read every
    10 ms, so a shorter spike can be missed; `reset_rss=True` reads the kernel's exact peak."""

    def __init__(self, device: torch.device | str, reset_rss: bool = False):
        self.device = torch.device(device)
        self.reset_rss = reset_rss
        self.peak: dict = {}
        self.start: dict = {}
        self._stop = threading.Event()
        self._thread = None
        self._rss = rss_bytes()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            now = rss_bytes()
            if now is not None:
                self._rss = max(self._rss or 0, now)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start[CUDA] = torch.cuda.memory_allocated(self.device)
        self._hwm = False
        if self.reset_rss:
            trim_malloc()
            self._hwm = reset_rss_peak()
            self._rss = rss_bytes()
        self.start[RSS] = self._rss
        if not self._hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        now = rss_high_water_bytes() if self._hwm else rss_bytes()
        self.peak[RSS] = None if now is None else max(self._rss or 0, now)
        if self.device.type == "cuda":
            self.peak[CUDA] = torch.cuda.max_memory_allocated(self.device)

    def above_start(self, key: str) -> int | None:
        """Peak minus the value at entry for `key` (RSS or CUDA), at least 0; None if unknown."""
        peak, start = self.peak.get(key), self.start.get(key)
        return None if peak is None or start is None else max(0, peak - start)
