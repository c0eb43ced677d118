"""Argument checks shared by the command line, the analysis and the library: each raises a
UsageError whose message names the flag and the fix (disk_shortfall only returns a warning, as
the planner's sizes may err on the large side)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .errors import UsageError, setting
from .kernels.backend import kernel_mode
from .storage.loading import model_context


def positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} {value}: must be at least 1")


def device(name: str) -> str:
    """The device a --device value names ('auto': CUDA when available, else the CPU)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{setting('device', name)}: no CUDA device is available; use "
                         f"{setting('device', 'cpu')}")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"{setting('device', name)}: use auto, cpu or cuda")
    return name


def seqlen(model_ref: str, value: int, flag: str = "--seqlen") -> None:
    """A window length that is positive and fits the model's context (read from its config)."""
    positive(value, flag)
    context = model_context(model_ref)
    if context is not None and value > context:
        raise UsageError(f"{flag} {value} exceeds the model's context of {context} tokens; "
                         f"use {flag} {context} or less")


def block_range(text: str | None) -> tuple[int, int] | None:
    """--blocks START:END parsed (the range itself is checked against the model by the driver)."""
    if text is None:
        return None
    try:
        start, end = (int(p) for p in text.split(":"))
    except ValueError:
        raise UsageError(f"--blocks {text!r}: write START:END, e.g. 0:8") from None
    return start, end


def kernel_backend() -> str:
    """The kernel choice of $SPARSE_EXPANSION_KERNELS (auto, torch or triton)."""
    try:
        return kernel_mode()
    except ValueError as e:
        raise UsageError(str(e)) from None


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size_bytes(text: str | None, flag: str) -> int | None:
    """'24GiB', '500MB', '1e9' -> bytes (None stays None)."""
    if text is None:
        return None
    number = text.strip().rstrip("BbIiKkMmGgTt")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise UsageError(f"{flag} {text!r}: write a size such as 24GiB, 500MB or 2000000000") from None
    if value < 1:
        raise UsageError(f"{flag} {text!r}: must be a positive size")
    return int(value)


def disk_shortfall(path: str, need: int, what: str) -> str | None:
    """A warning when the file system that will hold `path` (it may not exist yet) has less free
    space than `need` bytes for `what`; None when it has enough."""
    folder = Path(path).resolve()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free >= need:
        return None
    return (f"{what} needs about {need / 2**30:.2f} GiB and {folder} has {free / 2**30:.2f} GiB free; "
            f"free space or write it elsewhere")
