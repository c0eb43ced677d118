"""Several processes through torch.distributed (torchrun; NCCL on GPUs, gloo on CPUs).

Every rank runs the same sequential pipeline and holds the whole pruned block before the next
one; what is split depends on the method:
- Sparse Expansion: every rank sees every calibration batch; rank 0 fits each group's router on
  them and sends it to the others (`from_leader`: one router, bit for bit, whatever the ranks'
  devices), and rank r solves a contiguous range of the clusters of every group; the ranks
  exchange the compressed experts. The result does not depend on the number of ranks, bit for bit.
- SparseGPT, Wanda, magnitude: rank r runs a contiguous share of the calibration batches
  through each block and the Hessians are all-reduced (`all_reduce_mean`); SparseGPT's rows,
  which share one inverse Hessian, are split too (`my_share` of the rows, then `gather_rows`),
  each column block's mask chosen over every rank's rows (`select_across_ranks`), so the masks
  are those of one process given the same Hessian. The Hessian's sum runs in another order
  than one process's, so the result equals the one-rank result up to float rounding.
Rank 0 alone writes checkpoints and the output.
"""
from __future__ import annotations

import datetime
import functools
import math
import os

import torch
import torch.distributed as dist

from .errors import UsageError
from .kernels.obs import block_mask


TIMEOUT_ENV = "SPARSE_EXPANSION_DIST_TIMEOUT"  # minutes a collective may wait (default 60)


def init_from_env(device: str) -> None:
    """Join the process group torchrun describes ($WORLD_SIZE > 1); no-op otherwise. Collectives
    wait up to $SPARSE_EXPANSION_DIST_TIMEOUT minutes (default 60, not torch's 10: the other ranks
    wait at a barrier while rank 0 writes a 70B model's output or checkpoint alone)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:  # object collectives (the experts' exchange) go through the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            minutes = float(os.environ.get(TIMEOUT_ENV, "60"))
        except ValueError:
            raise UsageError(f"${TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}: give minutes, e.g. 120") from None
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=minutes))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_device(device: str) -> str:
    """cuda -> cuda:$LOCAL_RANK under torchrun (one GPU per process); anything else as given."""
    if device == "cuda" and dist.is_initialized():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def share(items: int, r: int, size: int) -> slice:
    """Rank r's contiguous range of `items` split over `size` ranks (the first ranks take one more
    when it does not divide)."""
    base, extra = divmod(items, size)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def my_share(items: int) -> slice:
    """This rank's contiguous range of `items`."""
    return share(items, rank(), world_size())


def gather_in_rank_order(obj) -> list:
    """Every rank's `obj` (picklable; tensors on the CPU), in rank order; [obj] with one process."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def from_leader(obj):
    """Rank 0's `obj` on every rank (pickled: for small objects such as a router fit, tensors on the
    CPU); `obj` itself with one process. The other ranks pass None."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_leader(items: list) -> list | None:
    """Every rank's `items` (picklable; tensors on the CPU) concatenated in rank order, on rank 0;
    None on the others; `items` itself with one process."""
    if world_size() == 1:
        return items
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(items, out, dst=0)
    return [item for part in out for item in part] if rank() == 0 else None


def all_reduce_mean(H: torch.Tensor, count: torch.Tensor) -> None:
    """In place: H [E, C, C], a mean over this rank's `count` [E] rows, becomes the mean over
    every rank's rows, and `count` their total."""
    if world_size() == 1:
        return
    H.mul_(count.to(H.dtype)[:, None, None])
    dist.all_reduce(H)
    dist.all_reduce(count)
    H.div_(count.clamp(min=1).to(H.dtype)[:, None, None])


def gather_rows(part: torch.Tensor, rows: int) -> torch.Tensor:
    """The whole [E, rows, ...] tensor on every rank from each rank's `my_share(rows)` of axis 1."""
    size = world_size()
    if size == 1:
        return part
    longest = math.ceil(rows / size)  # all_gather needs one shape: pad every share to the longest
    padded = part.new_zeros(part.shape[0], longest, *part.shape[2:])
    padded[:, :part.shape[1]] = part
    out = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(out, padded)
    return torch.cat([o[:, :_length(share(rows, r, size))] for r, o in enumerate(out)], dim=1)


def _length(s: slice) -> int:
    return s.stop - s.start


def select_across_ranks(score: torch.Tensor, sparsity: float, rows: int) -> torch.Tensor:
    """`kernels.obs.block_mask` of the block's scores over every rank's rows (this rank's
    `my_share(rows)` of them in `score` [E, r, B]); this rank's part of the pruned mask."""
    return block_mask(gather_rows(score, rows), sparsity)[:, my_share(rows)]


def row_selector(rows: int):
    """The mask chooser for a solve of this rank's share of `rows` rows (obs_prune's `select`)."""
    return block_mask if world_size() == 1 else functools.partial(select_across_ranks, rows=rows)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_split(method: str, clusters: int | None, ranks: int, batches: int) -> None:
    """Refuse a world size that does not divide the work: Sparse Expansion (`clusters` given)
    needs a cluster per rank, the other methods a calibration batch per rank."""
    if ranks == 1:
        return
    if clusters is None:
        if ranks > batches:
            raise UsageError(f"{ranks} ranks for {batches} calibration batches: every rank needs a batch; use at "
                             f"most {batches} ranks, more --nsamples or a smaller --batch-size")
        return
    if ranks > clusters:
        raise UsageError(f"{ranks} ranks for {clusters} clusters: every rank needs a cluster; use at most "
                         f"{clusters} ranks (--nproc-per-node x --nnodes) or more --clusters")
