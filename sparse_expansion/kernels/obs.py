"""Batched OBS (SparseGPT) pruning of E same-shaped weight matrices.

Given W [E, R, C] and the upper Cholesky factor of each inverse Hessian Hinv [E, C, C], process
the columns in blocks: choose the block's mask (unstructured: the lowest w²/diag(Hinv)² of the
block at the target rate; N:M: the lowest N of every M consecutive columns, chosen inside the
column loop), then for each column zero the pruned weights (optionally quantize the kept ones),
propagate the error to the block's remaining columns with Hinv's row, and finally apply the
block's accumulated error to all later columns with one batched matrix product.

Triton version (`obs_prune_triton`): per 128-column block, the unstructured mask is chosen in
torch exactly as the reference does; then one launch over (row tile, matrix) runs the column
loop in sub-blocks of 32 columns held in registers (rows are independent once the mask is
known; N:M masks are chosen inside the loop), each sub-block's errors reaching the rest of the
block through a tensor-core dot, writes the pruned/quantized block in place and the error
block; the lazy update of the trailing columns is a tensor-core Triton GEMM (`_trailing_kernel`;
fp32 as tf32x3 where that beats the FMA units torch's fp32 baddbmm runs on, see dot_precision),
in two levels: each block updates the rest of its super-block of up to FAR_BLOCKS blocks, and
each super-block the columns past it, which are thus read and written a FAR_BLOCKS-th as often.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton_utils import check_launch, dot_precision, interpreted, next_pow2
from .backend import use_triton


@dataclass(frozen=True)
class QuantGrid:
    """Per-row asymmetric min-max grid: q(x) = scale·(clamp(round(x/scale)+zero, 0, maxq) − zero)."""
    scale: torch.Tensor  # [E, R, 1]
    zero: torch.Tensor   # [E, R, 1]
    maxq: int


def find_quant_grid(W: torch.Tensor, bits: int) -> QuantGrid:
    """Per-output-row grid of 2**bits levels spanning [min(w, 0), max(w, 0)] (SparseGPT's)."""
    maxq = 2 ** bits - 1
    xmin = W.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = W.amax(dim=-1, keepdim=True).clamp(min=0)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return QuantGrid(scale, zero, maxq)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


UPDATE_COLUMNS = 32  # columns per error-propagation step of the torch reference


def bracket_kth_value(score: torch.Tensor, k: int, sample: int = 16384) -> torch.Tensor:
    """torch.kthvalue(score, k, dim=1, keepdim=True).values for score [E, n], exactly, when the
    rows are long: a strided sample of each row brackets the k-th value, one pass counts what
    lies below and inside the bracket, and only the values inside (~5% of the row) are sorted.
    On a GPU kthvalue runs one thread block per row, which for SparseGPT's few long rows (one per
    matrix: a whole 128-column block) cost more than the OBS kernel. A bracket that misses (ties,
    NaNs, an unlucky sample, more values inside than its fixed width) falls back to kthvalue
    itself, so the result never changes. Every shape is known up front: the host waits once, for
    that check."""
    E, n = score.shape
    if n < 8 * sample:
        return torch.kthvalue(score, k, dim=1, keepdim=True).values
    q = k / n
    margin = 6 * (q * (1 - q) / sample) ** 0.5 + 2 / sample  # 6 standard deviations of the sample quantile
    width = min(n, int(2 * (2 * margin + 2 / sample) * n))  # twice the bracket's expected share of the row
    ranks = torch.tensor([int((q - margin) * sample), int((q + margin) * sample)], device=score.device)
    picked = score[:, ::n // sample][:, :sample].sort(dim=1).values[:, ranks.clamp(0, sample - 1)]
    lo = torch.where(ranks[0] >= 0, picked[:, :1], -torch.inf)
    hi = torch.where(ranks[1] < sample, picked[:, 1:], torch.inf)
    below = (score < lo).sum(1)
    inside = (score >= lo) & (score <= hi)
    count = inside.sum(1)
    if not bool(((below < k) & (below + count >= k) & (count <= width)).all()):  # the one wait
        return torch.kthvalue(score, k, dim=1, keepdim=True).values
    # each row's values inside, in row order, to the front of a [E, width] row; the rest to a spare column
    place = torch.where(inside, inside.cumsum(1) - 1, width)
    padded = score.new_full((E, width + 1), torch.inf).scatter_(1, place, score)[:, :width]
    return padded.sort(dim=1).values.gather(1, (k - 1 - below)[:, None])


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask [E, n] marking exactly the k lowest scores of each row of score [E, n].

    A k-th value threshold (several times faster than topk for k ~ n/2 on CPU; on a GPU found by
    `bracket_kth_value`); ties at the threshold go to the lowest indices.
    """
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if score.is_cuda:
        thresh = bracket_kth_value(score, k)
    else:
        thresh = torch.kthvalue(score, k, dim=1, keepdim=True).values
    mask = score < thresh
    ties = score == thresh
    need = k - mask.sum(1, keepdim=True)
    return mask | (ties & (ties.cumsum(1) <= need))


def block_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Pruned mask [E, R, B] of a column block's scores [E, R, B]: the lowest `sparsity` fraction
    of each matrix's block (SparseGPT's unstructured choice)."""
    E = score.shape[0]
    return lowest_k_mask(score.reshape(E, -1), int(score[0].numel() * sparsity)).view(score.shape)


def obs_prune_reference(W: torch.Tensor, Hinv: torch.Tensor, sparsity: float = 0.0,
                        prune_n: int = 0, prune_m: int = 0, grid: QuantGrid | None = None,
                        blocksize: int = 128, select=block_mask, in_place: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune E matrices at once. Returns (pruned weights [E, R, C] fp32, kept mask [E, R, C]).

    W: [E, R, C] (any float dtype; computed in fp32). Hinv: [E, C, C] fp32 upper Cholesky factor
    of H⁻¹. Unstructured at rate `sparsity` when prune_n == 0, else prune_n of every prune_m
    consecutive columns (blocksize is then rounded down to a multiple of prune_m). `select(score,
    sparsity)` chooses an unstructured block's pruned mask from its scores [E, R, B] (default
    `block_mask`; a solve of some of the rows passes one that sees every row's scores).

    The mask of each `blocksize` block is chosen at its start, as in SparseGPT; the column loop
    then runs over sub-blocks of UPDATE_COLUMNS columns whose errors reach all later columns
    through one matrix product each. This is the same computation as updating the whole block
    column by column (up to rounding) with ~4x less elementwise work, which is what costs on CPU.
    """
    if in_place:
        _check_own_copy(W)
    else:
        W = W.float().clone()
    E, R, C = W.shape
    pruned = torch.zeros_like(W, dtype=torch.bool)
    sub = UPDATE_COLUMNS
    if prune_n:
        blocksize = max(prune_m, blocksize - blocksize % prune_m)
        sub = max(prune_m, sub - sub % prune_m)  # an N:M group never straddles two sub-blocks
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        if not prune_n and sparsity > 0:
            d = torch.diagonal(Hinv[:, i1:i2, i1:i2], dim1=1, dim2=2)
            pruned[:, :, i1:i2] = select(W[:, :, i1:i2] ** 2 / d[:, None, :] ** 2, sparsity)
        for j1 in range(i1, i2, sub):
            j2 = min(j1 + sub, i2)
            W1 = W[:, :, j1:j2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[:, j1:j2, j1:j2]
            d = torch.diagonal(Hinv1, dim1=1, dim2=2)  # [E, count]
            mask1 = pruned[:, :, j1:j2]  # a view: N:M choices are written through
            # without rounding, err = w·m/d (m = 1 where pruned) and the column's own update
            # w -= err·d leaves w where kept and ~0 where pruned (made exactly 0 below): 2 ops a column
            over_d = None if grid is not None or prune_n else mask1 / d[:, None, :]
            for i in range(j2 - j1):
                w = W1[:, :, i]
                if prune_n and i % prune_m == 0:
                    score = W1[:, :, i:i + prune_m] ** 2 / d[:, None, i:i + prune_m] ** 2
                    idx = torch.topk(score, prune_n, dim=2, largest=False).indices
                    mask1[:, :, i:i + prune_m].scatter_(2, idx, True)
                    if grid is None:
                        over_d = mask1[:, :, i:i + prune_m] / d[:, None, i:i + prune_m]
                if grid is None:
                    err = torch.mul(w, over_d[:, :, i % prune_m if prune_n else i], out=Err1[:, :, i])
                    W1[:, :, i:].addcmul_(err[:, :, None], Hinv1[:, None, i, i:], value=-1.0)
                    continue
                q = quantize(w.masked_fill(mask1[:, :, i], 0.0), grid.scale[:, :, 0], grid.zero[:, :, 0], grid.maxq)
                err = (w - q) / d[:, None, i]
                W1[:, :, i:].addcmul_(err[:, :, None], Hinv1[:, None, i, i:], value=-1.0)
                W1[:, :, i] = q
                Err1[:, :, i] = err
            if grid is None:
                W1.masked_fill_(mask1, 0.0)
            W[:, :, j1:j2] = W1
            if j2 < C:
                W[:, :, j2:].baddbmm_(Err1, Hinv[:, j1:j2, j2:], alpha=-1.0)
    return W, ~pruned


@triton.jit
def _obs_block_kernel(W, PRUNED, HINV, ERR, SCALE, ZERO,
                      R, C, i1, count, maxq,
                      stride_we, stride_wr, stride_pe, stride_pr, stride_ee, stride_er,
                      PRUNE_N: tl.constexpr, PRUNE_M: tl.constexpr, QUANT: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SUB: tl.constexpr, PREC: tl.constexpr):
    """Column loop of one block (columns i1:i1+count) for one row tile of one matrix.

    W [E, R, C] fp32 (columns contiguous) is read and overwritten with the block's result Q;
    PRUNED [E, R, C] uint8 (1 = pruned) is read (unstructured) or written (N:M, PRUNE_N > 0);
    HINV [E, C, C] fp32 contiguous; ERR [E, R, ≥count] fp32 receives the scaled errors;
    SCALE/ZERO [E, R] fp32 the per-row quantization grid when QUANT.

    The block runs as sub-blocks of SUB columns: the column loop updates only its sub-block (held
    in registers), and the sub-block's errors reach the rest of the block through one tensor-core
    dot, Err[BLOCK_R, SUB] @ Hinv[SUB, BLOCK_C], as the torch reference does. The block's
    working copy lives in W itself between sub-blocks (the program's own rows, in L1/L2).
    """
    pid_r = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    sub = tl.arange(0, SUB)
    block = tl.arange(0, BLOCK_C)
    hblk = HINV + (e * C + i1) * C + i1  # Hinv1[a, b] = hblk[a * C + b]; int64: i1·C passes 2^31 for C > 46,340
    w_row = W + e * stride_we + rows[:, None] * stride_wr + i1
    if QUANT:
        scale = tl.load(SCALE + e * R + rows, mask=rmask, other=1.0)
        zero = tl.load(ZERO + e * R + rows, mask=rmask, other=0.0)

    for s in range(0, count, SUB):
        cols = s + sub  # this sub-block's columns, relative to the block
        cmask = cols < count
        tmask = rmask[:, None] & cmask[None, :]
        p_ptrs = PRUNED + e * stride_pe + rows[:, None] * stride_pr + (i1 + cols)[None, :]
        Wt = tl.load(w_row + cols[None, :], mask=tmask, other=0.0)
        diag = tl.load(hblk + cols * (C + 1), mask=cmask, other=1.0)
        if PRUNE_N == 0:
            P = tl.load(p_ptrs, mask=tmask, other=0) != 0
        else:
            P = tl.zeros((BLOCK_R, SUB), dtype=tl.int1)
        Err = tl.zeros((BLOCK_R, SUB), dtype=tl.float32)
        for i in range(tl.minimum(SUB, count - s)):
            sel = sub[None, :] == i
            if PRUNE_N > 0:
                if i % PRUNE_M == 0:
                    # prune the PRUNE_N lowest w²/d² of columns i..i+PRUNE_M-1 (ties: lower column)
                    S = tl.math.div_rn(Wt * Wt, (diag * diag)[None, :])
                    rank = tl.zeros((BLOCK_R, SUB), dtype=tl.int32)
                    for k in tl.static_range(PRUNE_M):
                        sk = tl.sum(tl.where(sub[None, :] == i + k, S, 0.0), axis=1)
                        before = (sk[:, None] < S) | ((sk[:, None] == S) & (i + k < sub[None, :]))
                        rank += tl.where(before & (s + i + k < count), 1, 0)
                    group = (sub >= i) & (sub < i + PRUNE_M) & cmask
                    P = P | (group[None, :] & (rank < PRUNE_N))
            w = tl.sum(tl.where(sel, Wt, 0.0), axis=1)
            pruned = tl.sum(tl.where(sel & P, 1, 0), axis=1) > 0
            q = tl.where(pruned, 0.0, w)
            if QUANT:
                # torch.round (half to even) without libdevice: adding 1.5·2^23 to |v| < 2^22
                # leaves no fraction bits (larger |v| are clamped to the grid's ends anyway)
                v = tl.math.div_rn(q, scale)
                v = tl.where(tl.abs(v) < 4194304.0, (v + 12582912.0) - 12582912.0, v)
                qi = tl.minimum(tl.maximum(v + zero, 0.0), maxq)
                q = scale * (qi - zero)
            d = tl.load(hblk + (s + i) * (C + 1))
            err = tl.math.div_rn(w - q, d)  # IEEE division, as torch
            h = tl.load(hblk + (s + i) * C + cols, mask=(sub > i) & cmask, other=0.0)
            Wt = tl.where(sel, q[:, None], Wt - err[:, None] * h[None, :])
            Err = tl.where(sel, err[:, None], Err)
        tl.store(w_row + cols[None, :], Wt, mask=tmask)
        tl.store(ERR + e * stride_ee + rows[:, None] * stride_er + cols[None, :], Err, mask=tmask)
        if PRUNE_N > 0:
            tl.store(p_ptrs, P.to(tl.uint8), mask=tmask)
        if s + SUB < count:  # the sub-block's errors reach the block's later columns: one dot
            later = (block >= s + SUB) & (block < count)
            Hs = tl.load(hblk + cols[:, None] * C + block[None, :], mask=cmask[:, None] & later[None, :], other=0.0)
            lmask = rmask[:, None] & later[None, :]
            Wl = tl.load(w_row + block[None, :], mask=lmask, other=0.0)
            tl.store(w_row + block[None, :], Wl - tl.dot(Err, Hs, input_precision=PREC), mask=lmask)
        tl.debug_barrier()  # the next sub-block's loads read what other threads stored


@triton.jit
def _trailing_kernel(W, ERR, HINV, R, C, i1, count, i2,
                     stride_we, stride_wr, stride_ee, stride_er, stride_he, stride_hr, stride_hc,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """W[e, :, i2:] −= ERR[e, :, :count] @ HINV[e, i1:i1+count, i2:] for one [BLOCK_M, BLOCK_N]
    tile of one matrix e (program (m, n, e)), accumulated in fp32 on tensor cores."""
    e = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = i2 + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rmask, cmask = rows < R, cols < C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, count, BLOCK_K):
        k = k0 + rk
        kmask = k < count
        a = tl.load(ERR + e * stride_ee + rows[:, None] * stride_er + k[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(HINV + e * stride_he + (i1 + k).to(tl.int64)[:, None] * stride_hr + cols[None, :] * stride_hc,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    ptrs = W + e * stride_we + rows[:, None] * stride_wr + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) - acc, mask=mask)


TRAILING_BLOCKS = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)  # on a GPU (fp32)


def trailing_update_reference(W: torch.Tensor, err: torch.Tensor, Hinv: torch.Tensor, i1: int, count: int) -> None:
    """The lazy update of the columns after a block, in place: W[:, :, i1+count:] −=
    err[:, :, :count] @ Hinv[:, i1:i1+count, i1+count:] (W, err [E, R, ≥count], Hinv [E, C, C] fp32)."""
    i2 = i1 + count
    W[:, :, i2:].baddbmm_(err[:, :, :count], Hinv[:, i1:i2, i2:], alpha=-1.0)


def trailing_update_triton(W: torch.Tensor, err: torch.Tensor, Hinv: torch.Tensor, i1: int, count: int,
                           end: int | None = None) -> None:
    """Triton version of `trailing_update_reference` (W and err contiguous in their last dim);
    `end`: update only the columns before it (default: all)."""
    E, R, C = W.shape
    C = C if end is None else min(end, C)  # the kernel updates columns [i2, C)
    i2 = i1 + count
    if i2 >= C or R == 0 or E == 0:
        return
    check_launch(_trailing_kernel, W, err, Hinv)
    if W.stride(2) != 1 or err.stride(2) != 1:
        raise ValueError("W and err must be contiguous in their last dimension")
    if interpreted(_trailing_kernel):  # the interpreter pays per program and K step: few, large blocks
        cfg = dict(BLOCK_M=next_pow2(R, 16, 128), BLOCK_N=128, BLOCK_K=next_pow2(count, 16, 128), num_warps=4,
                   num_stages=1)
    else:
        cfg = TRAILING_BLOCKS
    grid = (triton.cdiv(R, cfg["BLOCK_M"]), triton.cdiv(C - i2, cfg["BLOCK_N"]), E)
    _trailing_kernel[grid](W, err, Hinv, R, C, i1, count, i2, W.stride(0), W.stride(1), err.stride(0), err.stride(1),
                           *Hinv.stride(), PREC=dot_precision(W.dtype, W.device), **cfg)


FAR_BLOCKS = 4  # blocks whose errors reach the columns past them in one trailing update (GPU)


def far_width(blocksize: int, columns: int) -> int:
    """Columns of the super-block after which the far columns are updated: up to FAR_BLOCKS
    blocks, and at most a quarter of the columns (the error buffer is R x far_width fp32)."""
    return blocksize * max(1, min(FAR_BLOCKS, columns // (4 * blocksize)))


def obs_sub_block(block_c: int, prune_m: int) -> int:
    """Columns per sub-block of the kernel's column loop: UPDATE_COLUMNS, unless an N:M group
    would straddle two sub-blocks (M does not divide it): then the whole block."""
    sub = min(UPDATE_COLUMNS, block_c)
    return sub if prune_m <= 1 or sub % prune_m == 0 else block_c


def _obs_rows_per_program(R: int, interpret: bool) -> int:
    if interpret:  # one program per few hundred rows: the interpreter pays per program
        return next_pow2(R, 16, 128)
    return 16


def obs_prune_triton(W: torch.Tensor, Hinv: torch.Tensor, sparsity: float = 0.0,
                     prune_n: int = 0, prune_m: int = 0, grid: QuantGrid | None = None,
                     blocksize: int = 128, select=block_mask, in_place: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `obs_prune_reference` (same arguments and results)."""
    if in_place:
        _check_own_copy(W)
    else:
        W = W.float().contiguous().clone()
    E, R, C = W.shape
    Hinv = Hinv.float().contiguous()
    if Hinv.shape != (E, C, C):
        raise ValueError(f"Hinv must be [E, C, C] = [{E}, {C}, {C}], got {list(Hinv.shape)}")
    if prune_n:
        if not 0 < prune_n <= prune_m:
            raise ValueError(f"N:M sparsity needs 0 < N <= M, got {prune_n}:{prune_m}")
        blocksize = max(prune_m, blocksize - blocksize % prune_m)
    if blocksize > 1024:
        raise ValueError("obs_prune_triton supports blocksize <= 1024")
    check_launch(_obs_block_kernel, W, Hinv)
    pruned = torch.zeros(E, R, C, dtype=torch.bool, device=W.device)
    pruned_u8 = pruned.view(torch.uint8)
    if E == 0 or R == 0 or C == 0:
        return W, ~pruned
    quant = grid is not None
    if quant:
        scale = grid.scale.float().expand(E, R, 1).reshape(E, R).contiguous()
        zero = grid.zero.float().expand(E, R, 1).reshape(E, R).contiguous()
        maxq = float(grid.maxq)
    else:
        scale = zero = W  # unused
        maxq = 0.0
    BLOCK_C = next_pow2(min(blocksize, C), 16)
    BLOCK_R = _obs_rows_per_program(R, interpreted(_obs_block_kernel))
    SUB = obs_sub_block(BLOCK_C, prune_m)
    # two levels of lazy updates: a block's errors reach the rest of its super-block at once, and
    # a super-block's errors (FAR_BLOCKS blocks) the columns past it in one product of depth
    # far_width, so that those columns are read and written once per super-block, not per block
    far = far_width(blocksize, C)
    err = torch.empty(E, R, min(far, C), dtype=torch.float32, device=W.device)
    launch = (triton.cdiv(R, BLOCK_R), E)
    for s1 in range(0, C, far):
        s2 = min(s1 + far, C)
        for i1 in range(s1, s2, blocksize):
            i2 = min(i1 + blocksize, s2)
            count = i2 - i1
            if not prune_n and sparsity > 0:
                d = torch.diagonal(Hinv[:, i1:i2, i1:i2], dim1=1, dim2=2)
                pruned[:, :, i1:i2] = select(W[:, :, i1:i2] ** 2 / d[:, None, :] ** 2, sparsity)
            block_err = err[:, :, i1 - s1:]
            _obs_block_kernel[launch](
                W, pruned_u8, Hinv, block_err, scale, zero, R, C, i1, count, maxq,
                W.stride(0), W.stride(1), pruned_u8.stride(0), pruned_u8.stride(1),
                err.stride(0), err.stride(1),
                PRUNE_N=prune_n, PRUNE_M=max(prune_m, 1), QUANT=quant,
                BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, SUB=SUB, PREC=dot_precision(W.dtype, W.device), num_warps=4)
            trailing_update_triton(W, block_err, Hinv, i1, count, end=s2)
        trailing_update_triton(W, err, Hinv, s1, s2 - s1)
    return W, ~pruned


def obs_prune(W, Hinv, sparsity=0.0, prune_n=0, prune_m=0, grid=None, blocksize=128, select=block_mask,
              in_place=False):
    """Entry point the driver calls; dispatches to the Triton kernel on CUDA (see backend)."""
    if use_triton(W):
        return obs_prune_triton(W, Hinv, sparsity, prune_n, prune_m, grid, blocksize, select, in_place)
    return obs_prune_reference(W, Hinv, sparsity, prune_n, prune_m, grid, blocksize, select, in_place)


def _check_own_copy(W: torch.Tensor) -> None:
    """in_place: W is the caller's own fp32 working copy, updated in place (no second [E, R, C]
    fp32 copy beside it); it must be contiguous fp32."""
    if W.dtype != torch.float32 or not W.is_contiguous():
        raise ValueError(f"in_place needs a contiguous fp32 W, got {W.dtype}")
