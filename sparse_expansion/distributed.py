"""Several processes through torch.distributed (torchrun; NCCL on GPUs, gloo on CPUs).

Every rank runs the same sequential pipeline on the same calibration data; the expert solves of
Sparse Expansion, the costly stage, are split: rank r solves a contiguous range of the clusters of
every group and the ranks exchange the compressed experts, so that every rank holds the whole
pruned block before the next one. Results do not depend on the number of ranks. Rank 0 alone
writes checkpoints and the output.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import UsageError


def init_from_env(device: str) -> None:
    """Join the process group torchrun describes ($WORLD_SIZE > 1); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_device(device: str) -> str:
    """cuda -> cuda:$LOCAL_RANK under torchrun (one GPU per process); anything else as given."""
    if device == "cuda" and dist.is_initialized():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def my_share(items: int) -> slice:
    """This rank's contiguous range of `items` (the first ranks take one more when it does not divide)."""
    size, r = world_size(), rank()
    base, extra = divmod(items, size)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def gather_in_rank_order(obj) -> list:
    """Every rank's `obj` (picklable; tensors on the CPU), in rank order; [obj] with one process."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_split(method: str, clusters: int | None, ranks: int) -> None:
    """Refuse a world size that does not divide the work: only Sparse Expansion's clusters are
    split, so other methods run as one process, and every rank needs at least one cluster."""
    if ranks == 1:
        return
    if clusters is None:
        raise UsageError(f"--method {method} does not split across ranks (only sparse-expansion's experts do); "
                         f"run it as one process, without torchrun")
    if ranks > clusters:
        raise UsageError(f"{ranks} ranks for {clusters} clusters: every rank needs a cluster; use at most "
                         f"{clusters} ranks (--nproc-per-node x --nnodes) or more --clusters")
