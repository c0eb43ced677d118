"""Per-cluster Hessian accumulation, H_c = 2/n_c · Σ_{t in c} x_t x_tᵀ, as running averages.

State: H [K, d, d] fp32 and counts [K] int64, updated in place batch by batch, exactly as
SparseGPT's `add_batch` does for K = 1 (H ← H·n/(n+m) + 2/(n+m)·XᵀX). Every update writes the
upper triangle (j ≥ i) of each H[c] only; the strict lower triangle is unspecified until
`complete_hessian` mirrors the upper one, once, when accumulation ends (half the products and
half the traffic of writing both triangles on every call).

Triton version: one launch for all clusters. The rows are sorted by label once in torch (one
copy of the batch; on an H200 the kernel reading contiguous rows ran 1.4-1.5x faster than the
same kernel gathering them through the permutation, benchmarks/results/tile_sweep_h200.json,
for a copy of 3-8% of its time). The grid is (upper-triangle tile pair, cluster). Each
program computes one d×d tile Σ_t x_t[i-tile] x_t[j-tile]ᵀ over its cluster's tokens with
tensor-core dots (fp32 accumulation; fp32 inputs as tf32x3 or ieee, see dot_precision), applies
the running-average rescale and writes the tile.
"""
import functools

import torch
import triton
import triton.language as tl

from ._triton_utils import capability, check_interpreted_dot, check_launch, dot_precision, interpreted, next_pow2
from .backend import use_triton


def accumulate_hessian_reference(H: torch.Tensor, counts: torch.Tensor, x: torch.Tensor,
                                 labels: torch.Tensor | None = None) -> None:
    """Add a batch to every cluster's Hessian in place.

    H: [K, d, d] fp32; counts: [K] int64; x: [N, d] any float dtype; labels: [N] ints in [0, K)
    or None (all tokens in cluster 0).
    """
    K = H.shape[0]
    x = x.reshape(-1, x.shape[-1]).float()
    if labels is None:
        labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    labels = labels.reshape(-1).long()
    added = torch.bincount(labels, minlength=K).to(counts.device)
    for c in torch.nonzero(added).flatten().tolist():
        xc = x[labels == c]
        n_old, n_new = int(counts[c]), int(counts[c]) + xc.shape[0]
        add_gram(H[c], xc, n_old / n_new, 2.0 / n_new)
    counts.add_(added)


def complete_hessian(H: torch.Tensor) -> torch.Tensor:
    """Mirror the upper triangle of every H[c] ([K, d, d] or [d, d]) onto its lower one, in place:
    call once after the last `accumulate_hessian`. Returns H, exactly symmetric."""
    for Hc in H.reshape(-1, *H.shape[-2:]):
        upper = Hc.triu(1)
        Hc.triu_().add_(upper.mT)
    return H


GRAM_BLOCK = 256


def add_gram(H: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> None:
    """H ← beta·H + alpha·xᵀx on the upper triangle: only the block rows' upper part is computed
    (half the products; on a 2-core CPU 2.4x faster than one full addmm at d = 1536), so the
    strict lower triangle is unspecified until `complete_hessian`."""
    d = H.shape[0]
    for i in range(0, d, GRAM_BLOCK):
        H[i:i + GRAM_BLOCK, i:].addmm_(x[:, i:i + GRAM_BLOCK].t(), x[:, i:], beta=beta, alpha=alpha)


@triton.jit
def _hessian_tile_kernel(X, OFFS, COUNTS, PAIR_I, PAIR_J, H,
                         d, stride_xn, stride_xd,
                         BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
                         PRELOAD: tl.constexpr):
    """H[c][I, J] ← H[c][I, J]·n/(n+m) + 2/(n+m)·Σ_{t in c} x_t[I] x_t[J]ᵀ (the upper tiles only),
    n = COUNTS[c] the tokens already in, m = OFFS[c+1] − OFFS[c] those of this batch.

    Program (p, c): tile pair p = (PAIR_I[p], PAIR_J[p]) with PAIR_J ≥ PAIR_I, cluster c; a
    cluster with no token in the batch returns at once. Cluster c owns the rows
    OFFS[c]:OFFS[c+1] of X (sorted by cluster).
    PRELOAD: the accumulator starts from the old tile, H·scale/alpha, and the tile is written as
    alpha·acc (the same sum, rounded differently), so that no second [BLOCK, BLOCK] fp32 tile is
    live beside the accumulator at the end: what lets 4 warps hold a 128x128 tile without
    spilling on sm_90. Otherwise the old tile is read after the loop.
    """
    pair = tl.program_id(0)
    c = tl.program_id(1)
    start = tl.load(OFFS + c)
    end = tl.load(OFFS + c + 1)
    if start == end:
        return
    ti = tl.load(PAIR_I + pair)
    tj = tl.load(PAIR_J + pair)

    ri = ti * BLOCK + tl.arange(0, BLOCK)
    rj = tj * BLOCK + tl.arange(0, BLOCK)
    mi = ri < d
    mj = rj < d
    rk = tl.arange(0, BLOCK_K)
    m = mi[:, None] & mj[None, :]
    p = H + (c.to(tl.int64) * d + ri[:, None]) * d + rj[None, :]  # int64: ri·d passes 2^31 for d > 46,340
    if PRELOAD:
        scale, alpha = _running_average(COUNTS, c, end - start)
        acc = tl.load(p, mask=m, other=0.0) * (scale / alpha)
    else:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        pos = k0 + rk
        mk = pos < end
        rows = pos.to(tl.int64)
        a = tl.load(X + rows[:, None] * stride_xn + ri[None, :] * stride_xd,
                    mask=mk[:, None] & mi[None, :], other=0.0)  # [BLOCK_K, BLOCK]
        b = tl.load(X + rows[:, None] * stride_xn + rj[None, :] * stride_xd,
                    mask=mk[:, None] & mj[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)

    if PRELOAD:
        tl.store(p, alpha * acc, mask=m)
    else:  # the factors only now: live across the loop they cost registers (fp32 on sm_80 spilled)
        scale, alpha = _running_average(COUNTS, c, end - start)
        tl.store(p, tl.load(p, mask=m, other=0.0) * scale + alpha * acc, mask=m)


@triton.jit
def _running_average(COUNTS, c, added):
    """(n/(n+m), 2/(n+m)) in fp64 rounded to fp32, as the reference's Python floats are."""
    n_old = tl.load(COUNTS + c).to(tl.float64)
    n_new = n_old + added.to(tl.float64)
    return (n_old / n_new).to(tl.float32), (2.0 / n_new).to(tl.float32)


@functools.lru_cache(maxsize=64)
def _tile_pairs(n_tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ij = torch.triu_indices(n_tiles, n_tiles, device=device).to(torch.int32)
    return ij[0].contiguous(), ij[1].contiguous()


def _hessian_blocks(d: int, dtype: torch.dtype, interpret: bool, capability: int = 80) -> dict:
    """Tiles and launch options for d features of `dtype` on a GPU of compute `capability` (90
    for sm_90)."""
    block = 128 if d > 64 else 64
    if interpret:  # the interpreter pays per program and per K step: few, large blocks
        return dict(BLOCK=next_pow2(d, 16, 128), BLOCK_K=128, PRELOAD=False, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # tf32x3 splits every operand in two: half the K tile keeps 0 spills
        return dict(BLOCK=block, BLOCK_K=16, PRELOAD=False, num_warps=8, num_stages=3)
    if capability >= 90:
        # one warpgroup per 128x128 tile: on an H200 1.38x (d=4096) and 1.31x (d=11008) faster
        # than 8 warps (tile_sweep_h200.json, k32w4s4 against k64w8s3); with the accumulator
        # preloaded it holds the tile in 255 registers without spilling (compile_bf16.json)
        return dict(BLOCK=block, BLOCK_K=32, PRELOAD=True, num_warps=4, num_stages=4)
    # on sm_80/86 4 warps spill with either epilogue: 8 do not
    return dict(BLOCK=block, BLOCK_K=64, PRELOAD=False, num_warps=8, num_stages=3)


def accumulate_hessian_triton(H: torch.Tensor, counts: torch.Tensor, x: torch.Tensor,
                              labels: torch.Tensor | None = None) -> None:
    """Triton version of `accumulate_hessian_reference` (same arguments, same in-place update).

    Nothing here waits for the GPU: the tokens per cluster come from a scatter_add (bincount
    sizes its output from the data, a host synchronisation), the grid covers every cluster (empty
    ones return at once) and the running-average factors are computed in the kernel, so a call
    is 4-8 small launches around the kernel (labels outside [0, K) make the scatter_add fail: an
    index error on the CPU, a device-side assertion on a GPU)."""
    K, d, _ = H.shape
    if H.dtype != torch.float32 or not H.is_contiguous():
        raise ValueError("H must be a contiguous fp32 tensor [K, d, d]")
    x = x.reshape(-1, x.shape[-1])
    if x.shape[-1] != d:
        raise ValueError(f"x has {x.shape[-1]} features, H is {d}x{d}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x = x.float()
    N = x.shape[0]
    if N == 0:
        return
    dev = H.device
    check_launch(_hessian_tile_kernel, H, x)
    check_interpreted_dot(_hessian_tile_kernel, x)
    added = torch.zeros(K, dtype=torch.int32, device=dev)  # int32 offsets: 64-bit loop indices cost registers
    if labels is None:
        added[:1].fill_(N)  # a fill, not a copy from the host
    else:
        labels = labels.reshape(-1).to(device=dev, dtype=torch.int64)
        if labels.numel() != N:
            raise ValueError(f"{labels.numel()} labels for {N} tokens")
        added.scatter_add_(0, labels, torch.ones_like(labels, dtype=torch.int32))
        x = x[torch.argsort(labels, stable=True)]
    offs = torch.zeros(K + 1, dtype=torch.int32, device=dev)
    torch.cumsum(added, 0, out=offs[1:])
    n_old = counts if counts.device == dev and counts.dtype == torch.int64 else counts.to(dev, torch.int64)

    cfg = _hessian_blocks(d, x.dtype, interpreted(_hessian_tile_kernel), capability(dev))
    pi, pj = _tile_pairs(triton.cdiv(d, cfg["BLOCK"]), dev)
    _hessian_tile_kernel[(pi.numel(), K)](
        x, offs, n_old.contiguous(), pi, pj, H, d, x.stride(0), x.stride(1),
        PREC=dot_precision(x.dtype, x.device), **cfg)
    counts.add_(added if counts.device == dev else added.to(counts.device))


def accumulate_hessian(H, counts, x, labels=None) -> None:
    """Entry point the driver calls; dispatches to the Triton kernel on CUDA (see backend).
    Writes the upper triangles: `complete_hessian(H)` once the last batch is in."""
    if use_triton(H):
        return accumulate_hessian_triton(H, counts, x, labels)
    return accumulate_hessian_reference(H, counts, x, labels)
