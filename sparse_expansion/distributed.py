"""Several processes through torch.distributed (torchrun; NCCL on GPUs, gloo on CPUs).

Every rank runs the same sequential pipeline and holds the whole pruned block before the next
one; what is split depends on the method:
- Sparse Expansion: every rank sees every calibration batch; rank 0 fits each group's router on
  them and sends it to the others (`from_leader`: one router, bit for bit, whatever the ranks'
  devices), and rank r solves a contiguous range of the clusters of every group; the ranks
  exchange the compressed experts (`gather_in_rank_order`: tensors as one byte buffer per rank).
  The result does not depend on the number of ranks, bit for bit.
- SparseGPT, Wanda, magnitude: rank r runs a contiguous share of the calibration batches
  through each block and the Hessians are all-reduced (`all_reduce_mean`); SparseGPT's rows,
  which share one inverse Hessian, are split too (`my_share` of the rows, then `gather_rows`),
  each column block's mask chosen over every rank's rows (`select_across_ranks`), so the masks
  are those of one process given the same Hessian. The Hessian's sum runs in another order
  than one process's, so the result equals the one-rank result up to float rounding.
Rank 0 alone writes checkpoints and the output; under the data-parallel methods the others send
it their activations for them (`gather_to_leader`).
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
    """Every rank's `obj` in rank order, on every rank; [obj] with one process. `obj` may nest
    tensors (any device) in dicts, lists and tuples: they travel as one byte buffer per rank
    (a tensor collective) and arrive on the CPU; what is not a tensor is pickled."""
    if world_size() == 1:
        return [obj]
    skeletons, buffers = _exchange_layout(obj)
    for r, skeleton in enumerate(skeletons):
        dist.broadcast(buffers[r], src=r)
    return [_unpack(skeleton, buffer) for skeleton, buffer in zip(skeletons, buffers)]


def from_leader(obj):
    """Rank 0's `obj` on every rank (pickled: for small objects such as a router fit, tensors on the
    CPU); `obj` itself with one process. The other ranks pass None."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_leader(items: list) -> list | None:
    """Every rank's `items` concatenated in rank order, on rank 0 (tensors as in
    `gather_in_rank_order`, sent to rank 0 alone); None on the others; `items` itself with one process."""
    if world_size() == 1:
        return items
    skeletons, buffers = _exchange_layout(items)
    if rank() != 0:
        dist.send(buffers[rank()], dst=0)
        return None
    for r in range(1, world_size()):
        dist.recv(buffers[r], src=r)
    return [item for skeleton, buffer in zip(skeletons, buffers) for item in _unpack(skeleton, buffer)]


class _Slot:
    """Where a tensor stood in an exchanged object: its bytes' place in its rank's buffer."""

    def __init__(self, start: int, t: torch.Tensor):
        self.start, self.nbytes, self.shape, self.dtype = start, t.numel() * t.element_size(), t.shape, t.dtype


def _exchange_layout(obj) -> tuple[list, list[torch.Tensor]]:
    """Every rank's skeleton (`obj` with its tensors replaced by `_Slot`s; small, all-gathered as a
    pickle) and a byte buffer per rank on the collectives' device: this rank's packed tensors, the
    others' empty and of their size."""
    tensors: list[torch.Tensor] = []
    skeleton = _strip(obj, tensors, [0])
    skeletons = [None] * world_size()
    dist.all_gather_object(skeletons, skeleton)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8).to(device) for t in tensors]
                     or [torch.empty(0, dtype=torch.uint8, device=device)])
    buffers = [mine if r == rank() else torch.empty(_size(s), dtype=torch.uint8, device=device)
               for r, s in enumerate(skeletons)]
    return skeletons, buffers


def _strip(obj, tensors: list, offset: list):
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        slot = _Slot(offset[0], obj)
        offset[0] += slot.nbytes
        return slot
    if isinstance(obj, dict):
        return {k: _strip(v, tensors, offset) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, tensors, offset) for v in obj)
    return obj


def _size(skeleton) -> int:
    if isinstance(skeleton, _Slot):
        return skeleton.start + skeleton.nbytes
    items = skeleton.values() if isinstance(skeleton, dict) else skeleton if isinstance(skeleton, (list, tuple)) else ()
    return max((_size(v) for v in items), default=0)


def _unpack(skeleton, buffer: torch.Tensor):
    """The object of `skeleton` with its tensors cut out of `buffer`, each a CPU tensor of its own."""
    if isinstance(skeleton, _Slot):
        raw = buffer[skeleton.start:skeleton.start + skeleton.nbytes].cpu().clone()  # own storage: aligned
        return raw.view(skeleton.dtype).reshape(skeleton.shape)
    if isinstance(skeleton, dict):
        return {k: _unpack(v, buffer) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_unpack(v, buffer) for v in skeleton)
    return skeleton


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
