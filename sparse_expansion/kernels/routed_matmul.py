"""Top-1 routed expert matmul: Y[t] = X[t] · W_{e(t)}ᵀ + b_{e(t)}.

Long because the op has three weight formats, each with its torch reference, its Triton kernel and
its decode (one-token) kernel, behind one dispatcher: splitting them would split the layouts
documented here from the code that reads them.

Weights are dense [E, d_out, d_in] or 2:4-compressed (`compress_24`): for every group of 4
consecutive inputs of a row the 2 kept values ([E, d_out, d_in/2], in column order) and their
positions, 2 bits each, packed 4 bits per group and 2 groups per byte, low nibble first
([E, d_out, ceil(d_in/8)] uint8; nibble = idx0 | idx1 << 2 with idx0 < idx1), or bitmask
(`bitmask_offsets`): each expert's kept values in row-major order, one after another (1-D), a
bit per weight ([E, d_out, d_in/8] uint8, numpy.packbits' order: the first column in the highest
bit), and where each expert's values start and, within the expert, where the values of each
64-column tile of a row start (so that a tile decodes without reading the rest of its row).

Triton version: tokens are sorted by expert and padded per expert to whole blocks of BLOCK_M
rows in torch, without a host synchronisation (like vLLM's moe_align_block_size); one grouped
kernel runs over (row block, output tile[, K split]) and gathers its tokens' rows, multiplies
them by its expert's weight tile (2:4 and bitmask weights are expanded to dense tiles in
registers: a bitmask tile's kept values are gathered by the running count of its bits) and
scatters the rows back to token order. Many tokens (prefill) use large tiles; few tokens
(decode) use 16-row blocks, narrow output tiles and a K split summed with fp32 atomics so that
enough programs stream the weights. Up to DECODE_TOKENS tokens on 16-bit 2:4 weights take
`_gemv_24_kernel` instead: one token per program on the FMA units, each kept value's input cut
out of its group's 64-bit word by a shift (no dense tile, ~1/3 of the instructions).
"""
import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ._triton_utils import (capability, check_interpreted_dot, check_launch, dot_precision, interpreted,
                            next_pow2, num_sms)
from .backend import use_triton


def routed_apply(x: torch.Tensor, expert: torch.Tensor, experts: int, out_features: int, apply) -> torch.Tensor:
    """Sort the tokens x [T, d_in] by expert [T], call apply(e, x_e) -> [n_e, out_features] once
    per non-empty expert on its contiguous slice, and scatter the results back to token order
    (output dtype = x.dtype)."""
    T = x.shape[0]
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=experts).tolist()
    xs = x[order]  # one gather, contiguous slices per expert, one scatter back
    ys = x.new_empty(T, out_features)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        ys[start:start + n] = apply(e, xs[start:start + n]).to(ys.dtype)
        start += n
    out = torch.empty_like(ys)
    out[order] = ys
    return out


def routed_matmul_reference(x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, d_in]; expert: [T] ints in [0, E); weight: [E, d_out, d_in]; bias: [E, d_out].

    Tokens are sorted by expert and each non-empty expert does one matmul over its tokens;
    the results are scattered back to token order. Output dtype = x.dtype.
    """
    def apply(e, xe):
        y = xe @ weight[e].t()
        return y if bias is None else y + bias[e]
    return routed_apply(x, expert, weight.shape[0], weight.shape[1], apply)


def compress_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress 2:4-sparse weights [E, d_out, d_in] (d_in a multiple of 4).

    Returns (values [E, d_out, d_in/2] in weight's dtype, meta [E, d_out, ceil(d_in/8)] uint8).
    Raises ValueError when a group of 4 consecutive inputs holds more than 2 nonzeros.
    """
    if weight.dim() != 3:
        raise ValueError(f"weight must be [E, d_out, d_in], got shape {list(weight.shape)}")
    E, N, K = weight.shape
    if K % 4:
        raise ValueError(f"2:4 compression needs d_in divisible by 4, got {K}")
    groups = weight.reshape(E, N, K // 4, 4)
    nz = groups != 0
    bad = nz.sum(-1) > 2
    if bad.any():
        e, n, g = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(
            f"weight is not 2:4 sparse: {int(bad.sum())} groups of 4 inputs have more than 2 "
            f"nonzeros (first: expert {e}, row {n}, inputs {4 * g}..{4 * g + 3}); prune it "
            "with 2:4 sparsity first")
    # keep the nonzero positions, topped up with zero positions, in column order
    pos = torch.arange(4, device=weight.device)
    key = (~nz).to(torch.int64) * 4 + pos
    idx = torch.sort(torch.topk(key, 2, dim=-1, largest=False).indices, dim=-1).values
    values = torch.gather(groups, -1, idx).reshape(E, N, K // 2).contiguous()
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [E, N, K/4]
    if nib.shape[-1] % 2:
        nib = torch.cat([nib, nib.new_zeros(E, N, 1)], dim=-1)
    meta = (nib[..., 0::2] | (nib[..., 1::2] << 4)).contiguous()
    return values, meta


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of `compress_24`: dense [E, d_out, 2·values.shape[-1]] in values' dtype."""
    E, N, Kh = values.shape
    G = Kh // 2
    nib = torch.stack([meta & 15, meta >> 4], dim=-1).reshape(E, N, -1)[..., :G].long()
    idx = torch.stack([nib & 3, nib >> 2], dim=-1)  # [E, N, G, 2]
    dense = values.new_zeros(E, N, G, 4)
    dense.scatter_(-1, idx, values.reshape(E, N, G, 2))
    return dense.reshape(E, N, 4 * G)


def routed_matmul_24_reference(x: torch.Tensor, expert: torch.Tensor, values: torch.Tensor,
                               meta: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`routed_matmul_reference` on 2:4-compressed weights (decompressed first)."""
    return routed_matmul_reference(x, expert, decompress_24(values, meta), bias)


BITMASK_TILE = tl.constexpr(64)  # columns per tile offset of the bitmask layout
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def bitmask_offsets(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The offsets of a bitmask [E, d_out, d_in/8] uint8 (one bit per weight, numpy.packbits'
    order): tile_offsets [E, d_out, ceil(d_in/64)] int32, the index among expert e's kept values
    (row-major) of the first one at or after column 64·t of row n; starts [E+1] int64, where each
    expert's values begin in the 1-D values."""
    if mask.dim() != 3 or mask.dtype != torch.uint8:
        raise ValueError(f"mask must be [E, d_out, d_in/8] uint8, got {mask.dtype} {list(mask.shape)}")
    E, N, B = mask.shape
    per_tile, tiles = BITMASK_TILE.value // 8, -(-B // (BITMASK_TILE.value // 8))
    popcount = _POPCOUNT.to(mask.device)
    counts = mask.new_zeros(E, N, tiles, dtype=torch.int32)
    for e in range(E):  # one expert's bytes at a time: the transient is 4 bytes per 8 weights of one expert
        per_byte = mask.new_zeros(N, tiles * per_tile, dtype=torch.int32)
        per_byte[:, :B] = popcount[mask[e].int()]
        counts[e] = per_byte.view(N, tiles, per_tile).sum(-1)
    counts = counts.view(E, -1)  # [E, N·tiles], row-major
    tile_offsets = (counts.cumsum(1) - counts).view(E, N, -1).to(torch.int32)
    starts = torch.cat([counts.new_zeros(1, dtype=torch.int64), counts.sum(1).cumsum(0)])
    return tile_offsets, starts


def decompress_bitmask(values: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e of a bitmask layout as a dense [d_out, d_in] matrix in values' dtype."""
    N, B = mask.shape[1:]
    values = values[starts[e]:starts[e + 1]]
    if values.numel() == 0:
        return values.new_zeros(N, 8 * B)
    kept = ((mask[e, :, :, None] >> torch.arange(7, -1, -1, device=mask.device, dtype=torch.uint8)) & 1).reshape(-1)
    # kept value k sits at the k-th set bit: gather by the running count of set bits (twice as
    # fast as masked_scatter on a CPU; pruned entries may come out as -0.0)
    position = torch.cumsum(kept, 0, dtype=torch.int32).sub_(1).clamp_(min=0)
    return values.take(position.long()).mul_(kept).view(N, 8 * B)


def routed_matmul_bitmask_reference(x: torch.Tensor, expert: torch.Tensor, values: torch.Tensor,
                                    mask: torch.Tensor, tile_offsets: torch.Tensor, starts: torch.Tensor,
                                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """`routed_matmul_reference` on bitmask weights (`bitmask_offsets`; each expert decompressed
    while its tokens are multiplied, so that E dense copies never exist)."""
    def apply(e, xe):
        y = xe @ decompress_bitmask(values, mask, starts, e).t()
        return y if bias is None else y + bias[e]
    return routed_apply(x, expert, mask.shape[0], mask.shape[1], apply)


@triton.jit
def _routed_kernel(X, W, META, TILE_OFFSETS, STARTS, B, Y, SORTED_IDS, BLOCK_EXPERT,
                   T, N, K,
                   stride_xt, stride_xk, stride_we, stride_wn, stride_wk,
                   stride_me, stride_mn, stride_oe, stride_on, stride_be, stride_yt, stride_yn,
                   SPARSE24: tl.constexpr, BITMASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SPLIT_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PREC: tl.constexpr):
    """Y[tok] (+)= X[tok] · W[e]ᵀ (+ B[e]) for the BLOCK_M tokens of row block program_id(0).

    SORTED_IDS [num_blocks·BLOCK_M] int32 token ids grouped by expert, padded with T;
    BLOCK_EXPERT [num_blocks] int64 expert of each block, -1 for unused blocks.
    Dense: W [E, N, K]. SPARSE24: W holds the kept values [E, N, K/2] and META the packed
    positions [E, N, ceil(K/8)] uint8. BITMASK: W holds the kept values (1-D), META the bits
    [E, N, K/8], TILE_OFFSETS [E, N, ceil(K/64)] and STARTS [E+1] their offsets. SPLIT_K > 1:
    program_id(2) sums every SPLIT_K-th K block and adds into fp32 Y with atomics (Y
    zero-initialised by the caller).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(BLOCK_EXPERT + pid_m)
    if e < 0:
        return
    e = e.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = tl.load(SORTED_IDS + offs_m)
    tmask = tok < T
    tok = tok.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    x_rows = X + tok[:, None] * stride_xt
    w_rows = W + e * stride_we + offs_n[:, None] * stride_wn  # [BLOCK_N, 1]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + offs_k[None, :] * stride_xk,
                    mask=tmask[:, None] & (offs_k < K)[None, :], other=0.0)
        if SPARSE24:
            # kept values of the tile's BLOCK_K/4 groups, and their positions (4 bits a group)
            offs_h = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            v = tl.load(w_rows + offs_h[None, :] * stride_wk,
                        mask=nmask[:, None] & (offs_h < K // 2)[None, :], other=0.0)
            offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            mb = tl.load(META + e * stride_me + offs_n[:, None] * stride_mn + offs_b[None, :],
                         mask=nmask[:, None] & (offs_b < (K + 7) // 8)[None, :], other=0)
            mb = mb.to(tl.int32)
            nib = tl.reshape(tl.join(mb & 15, mb >> 4), (BLOCK_N, BLOCK_K // 4))
            i0 = nib & 3
            i1 = nib >> 2
            v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))
            zero = tl.zeros_like(v0)
            d0 = tl.where(i0 == 0, v0, zero)
            d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
            d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
            d3 = tl.where(i1 == 3, v1, zero)
            # [BLOCK_N, G, 2, 2] with element [g, a, b] = d_{2a+b} → dense [BLOCK_N, BLOCK_K]
            wt = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))
        elif BITMASK:
            # the tile's bits (8 columns a byte, the first in the highest bit); a kept weight's value
            # sits at its tile's offset plus the number of kept weights before it in the tile
            offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            mb = tl.load(META + e * stride_me + offs_n[:, None] * stride_mn + offs_b[None, :],
                         mask=nmask[:, None] & (offs_b < K // 8)[None, :], other=0).to(tl.int32)
            kept = tl.reshape((mb[:, :, None] >> (7 - tl.arange(0, 8))[None, None, :]) & 1, (BLOCK_N, BLOCK_K))
            first = tl.load(TILE_OFFSETS + e * stride_oe + offs_n * stride_on + k0 // BITMASK_TILE,
                            mask=nmask, other=0)
            position = first[:, None] + tl.cumsum(kept, axis=1) - kept
            wt = tl.load(W + tl.load(STARTS + e) + position, mask=kept != 0, other=0.0)
        else:
            wt = tl.load(w_rows + offs_k[None, :] * stride_wk,
                         mask=nmask[:, None] & (offs_k < K)[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(wt.to(a.dtype)), acc, input_precision=PREC)

    if HAS_BIAS:
        bias = tl.load(B + e * stride_be + offs_n, mask=nmask, other=0.0).to(tl.float32)
        if SPLIT_K == 1:
            acc += bias[None, :]
        else:
            acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    y_ptrs = Y + tok[:, None] * stride_yt + offs_n[None, :] * stride_yn
    ymask = tmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=ymask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=ymask)


@triton.jit
def _gemv_24_kernel(X, V, META, B, Y, EXPERT, N, K,
                    stride_xt, stride_ve, stride_vn, stride_me, stride_mn, stride_be, stride_yt,
                    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[t] (+)= X[t] · W[EXPERT[t]]ᵀ (+ B) for token t = program_id(0), 2:4 weights of 16-bit type
    decoded on the FMA units instead of expanded into a dense tile: each group of 4 inputs is
    read as one 64-bit word of X, each pair of kept values as one 32-bit word of V, and a kept
    value's input is cut out of its group's word by a shift of 16 x its 2-bit position (the 4
    positions of 4 groups are one 16-bit word of META). Strides are in elements; the caller
    checks that X's rows start on 8 bytes and V's and META's rows on 4 and 2 (`gemv_24_ready`).
    EVEN: N and K are multiples of the tile (no masks). SPLIT_K > 1 adds into fp32 Y."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(EXPERT + t).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    WORDS: tl.constexpr = BLOCK_K // 16  # 16 inputs: 4 groups, a 16-bit word of positions
    j = tl.arange(0, 4)[None, None, :]  # the group within its word
    x_groups = X.to(tl.pointer_type(tl.int64)) + t.to(tl.int64) * (stride_xt // 4)
    v_pairs = (V.to(tl.pointer_type(tl.int32)) + e * (stride_ve // 2)
               + offs_n[:, None, None].to(tl.int64) * (stride_vn // 2))
    m_words = (META.to(tl.pointer_type(tl.int16)) + e * (stride_me // 2)
               + offs_n[:, None].to(tl.int64) * (stride_mn // 2))
    acc = tl.zeros((BLOCK_N, WORDS, 4), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        w = k0 // 16 + tl.arange(0, WORDS)
        g = 4 * w[None, :, None] + j  # [1, WORDS, 4] group index
        if EVEN:
            xq = tl.load(x_groups + g)
            v = tl.load(v_pairs + g)
            m = tl.load(m_words + w[None, :])
        else:
            gmask = g < K // 4
            xq = tl.load(x_groups + g, mask=gmask, other=0)
            v = tl.load(v_pairs + g, mask=nmask[:, None, None] & gmask, other=0)
            m = tl.load(m_words + w[None, :], mask=nmask[:, None] & (w < K // 16)[None, :], other=0)
        nib = m.to(tl.int32)[:, :, None] >> (4 * j)  # idx0 | idx1 << 2 in the low bits
        shift0 = ((nib << 4) & 48).to(tl.int64)  # 16·idx0
        shift1 = ((nib << 2) & 48).to(tl.int64)  # 16·idx1
        x0 = (xq >> shift0).to(tl.int16).to(X.dtype.element_ty, bitcast=True).to(tl.float32)
        x1 = (xq >> shift1).to(tl.int16).to(X.dtype.element_ty, bitcast=True).to(tl.float32)
        v0 = v.to(tl.int16).to(X.dtype.element_ty, bitcast=True).to(tl.float32)
        v1 = (v >> 16).to(tl.int16).to(X.dtype.element_ty, bitcast=True).to(tl.float32)
        acc += v0 * x0
        acc += v1 * x1
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        y += tl.where(pid_k == 0, tl.load(B + e * stride_be + offs_n, mask=nmask, other=0.0).to(tl.float32), 0.0)
    if SPLIT_K == 1:
        tl.store(Y + t * stride_yt + offs_n, y.to(Y.dtype.element_ty), mask=nmask)
    else:
        tl.atomic_add(Y + t * stride_yt + offs_n, y, mask=nmask)


@dataclass(frozen=True)
class RoutedConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 3


def gpu_configs(fmt: str, element_size: int, capability: int = 80) -> dict[str, RoutedConfig]:
    """The configurations default_config picks on a GPU of compute `capability` (e.g. 90) for
    weights of format `fmt` ('dense', '2:4' or 'bitmask'), by name (_compile.py compiles
    each). 4-byte (fp32) operands take half the K tile, and 64-row prefill tiles: at the 16-bit
    tiles fp32 prefill needs 196-295 KB of shared memory, over every target's limit, and at 128
    rows it spills on sm_80/86 (tf32x3 holds every operand twice). Bitmask tiles span whole
    64-column tile offsets."""
    k = 2 if element_size >= 4 else 1
    sparse24 = fmt == "2:4"
    fp32_24 = k == 2 and sparse24  # on sm_86's FMA units (dot_precision) it spills at the larger tiles
    n = 64 if fp32_24 else 128
    if capability >= 90 and k == 1 and fmt == "dense":
        # 256-column tiles, 3 stages (147 KB of shared memory, beyond sm_80/86): the best of 18
        # tiles on an H200, 1.2-1.3x faster than 128 columns at 8192 tokens (tile_sweep_h200.json)
        prefill = RoutedConfig(128, 256, 64, 1, 8, 3)
    else:
        prefill = RoutedConfig(128 // k, n, 64 // k, 1, 8, 4)
    configs = {
        "prefill": prefill,  # >= 128 tokens per expert
        # 8 warps: with 4, sm_90's compiler aborts on the 2:4 path (LLVM "Illegal shared layout")
        # and sm_80 needs 255 registers
        "prefill,m64": RoutedConfig(64, n, 64 // k, 1, 8, 4),  # fewer tokens per expert
        # decode: memory bound, the weight stream spread over many programs (split-K added below)
        "decode": RoutedConfig(16, 32, 64 if fp32_24 else (256 if sparse24 else 128) // k, 1, 4, 4),
    }
    if sparse24 and k == 1:
        # up to DECODE_TOKENS tokens: one token per program on the FMA units (_gemv_24_kernel,
        # BLOCK_M 1); 0.11-0.12 SASS instructions per weight per warp on sm_80/90 against the
        # dense-tile path's 0.37, 72 registers, no spills
        configs["gemv"] = RoutedConfig(1, 32, 256, 1, 4, 4)
    if fmt == "bitmask":
        # whole 64-column tile offsets; narrower tiles than dense: decoding a tile takes ~8x the
        # dense path's instructions per weight, which at BLOCK_N 32 (decode) or 128 (m64) needs 255
        # registers and spills. Of the spill-free tiles compiled, these issue the fewest SASS
        # instructions per weight on sm_80 and sm_90 (decode 0.51, m64 0.45-0.62, prefill 0.44-0.77)
        # (fp32: tf32x3 holds every operand twice, so 32 x 32 tiles for both prefill configurations)
        configs = {"prefill": RoutedConfig(128, 128, 64, 1, 8, 4) if k == 1 else RoutedConfig(32, 32, 64, 1, 4, 4),
                   "prefill,m64": RoutedConfig(64, 64, 64, 1, 4, 4) if k == 1 else RoutedConfig(32, 32, 64, 1, 4, 4),
                   "decode": RoutedConfig(16, 16, 128 // k, 1, 2, 4)}
    return configs


def default_config(T: int, E: int, N: int, K: int, fmt: str, device: torch.device, interpret: bool,
                   element_size: int = 2, gemv: bool = True) -> RoutedConfig:
    """Block sizes for T tokens over E experts, d_out N, d_in K, weights of format `fmt`,
    operands of `element_size` bytes (no GPU tuning table yet). `gemv`: the operands suit the
    2:4 FMA decode path (`gemv_24_ready`); it serves up to DECODE_TOKENS tokens."""
    gemv = gemv and fmt == "2:4" and element_size == 2 and T <= DECODE_TOKENS and K % 16 == 0
    if interpret:  # few, large programs: the interpreter pays per program and K step
        lo = BITMASK_TILE.value if fmt == "bitmask" else 32
        return RoutedConfig(1 if gemv else 16, next_pow2(N, 16, 64), next_pow2(K, lo, 128), 1, 4, 1)
    configs = gpu_configs(fmt, element_size, capability(device))
    if T <= 64:
        cfg = configs["gemv" if gemv else "decode"]
        programs = (T if T <= DECODE_TOKENS else min(T, E)) * triton.cdiv(N, cfg.BLOCK_N)
        split = 1
        while programs * split < 2 * num_sms(device) and K // (cfg.BLOCK_K * split * 2) >= 4:
            split *= 2
        return replace(cfg, SPLIT_K=split)
    return configs["prefill" if T / max(1, min(E, T)) >= 128 else "prefill,m64"]


DECODE_TOKENS = 16  # up to this many tokens, one row block per token (token_blocks), no sorting


def token_blocks(expert: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """align_tokens' outputs for decoding: one row block per token, token t first in block t (the
    rest padding), block_expert = expert. Each program reads its own token's expert directly;
    tokens that share an expert read its weights once each (at most DECODE_TOKENS times), which
    costs less than the ~15 small launches of sorting when a step is a few microseconds. The
    ids depend only on the token count, so they are made once per count: no launch at all."""
    return _decode_ids(expert.numel(), block_m, expert.device), expert


@functools.lru_cache(maxsize=4 * DECODE_TOKENS)
def _decode_ids(T: int, block_m: int, device: torch.device) -> torch.Tensor:
    ids = torch.full((T, block_m), T, dtype=torch.int32, device=device)
    ids[:, 0] = torch.arange(T, dtype=torch.int32, device=device)
    return ids.view(-1)


def align_tokens(expert: torch.Tensor, E: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group token ids by expert, each expert padded to whole blocks of `block_m`.

    No host synchronisation (CUDA-graph capturable): the block count is an upper bound.

    Returns sorted_ids [num_blocks·block_m] int32 (padding = T) and block_expert [num_blocks]
    int64 (-1 for the unused tail), num_blocks = ceil(T/block_m) + min(E, T) (an upper bound).
    """
    T = expert.numel()
    dev = expert.device
    # scatter_add, not bincount: bincount syncs with the host on CUDA (no graph capture)
    counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(
        0, expert, torch.ones_like(expert))
    nb = (counts + block_m - 1) // block_m
    cum_nb = torch.cumsum(nb, 0)
    num_blocks = triton.cdiv(T, block_m) + min(E, T)
    be = torch.searchsorted(cum_nb, torch.arange(num_blocks, device=dev), right=True)
    block_expert = torch.where(be < E, be, -1)
    order = torch.argsort(expert, stable=True)
    sorted_e = expert[order]
    tok_start = torch.cumsum(counts, 0) - counts
    dest = (cum_nb - nb)[sorted_e] * block_m + torch.arange(T, device=dev) - tok_start[sorted_e]
    sorted_ids = torch.full((num_blocks * block_m,), T, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    return sorted_ids, block_expert


def _routed(x, expert, fmt: str, weights: tuple, bias, E: int, N: int, K: int, config: RoutedConfig | None):
    """Launch the kernel on the weights of format `fmt`: (W,), (values, meta) or (values, mask,
    tile_offsets, starts)."""
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must be [T, {K}], got {list(x.shape)}")
    T = x.shape[0]
    check_launch(_routed_kernel, x, expert, *weights, bias)
    if T == 0:
        return x.new_empty(0, N)
    expert = expert.reshape(-1).long().contiguous()
    if expert.numel() != T:
        raise ValueError(f"{expert.numel()} expert ids for {T} tokens")
    gemv = fmt == "2:4" and gemv_24_ready(x, *weights)
    cfg = config or default_config(T, E, N, K, fmt, x.device, interpreted(_routed_kernel), x.element_size(), gemv)
    if cfg.BLOCK_M == 1:
        if not gemv:
            raise ValueError("BLOCK_M 1 (the FMA decode path) takes 2:4 weights of x's 16-bit dtype, "
                             "d_in a multiple of 16, and aligned contiguous rows (gemv_24_ready)")
        return _gemv_24(x, expert, *weights, bias, N, K, cfg)
    check_interpreted_dot(_routed_kernel, x, weights[0])
    if fmt == "2:4" and cfg.BLOCK_K % 8:
        raise ValueError("2:4 weights need BLOCK_K divisible by 8")
    if fmt == "bitmask" and cfg.BLOCK_K % BITMASK_TILE.value:
        raise ValueError(f"bitmask weights need BLOCK_K divisible by {BITMASK_TILE.value}")
    if T <= DECODE_TOKENS:
        sorted_ids, block_expert = token_blocks(expert, cfg.BLOCK_M)
    else:
        sorted_ids, block_expert = align_tokens(expert, E, cfg.BLOCK_M)
    if cfg.SPLIT_K > 1:
        y = torch.zeros(T, N, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    w = weights[0]
    meta = weights[1] if fmt != "dense" else w
    tile_offsets, starts = weights[2:] if fmt == "bitmask" else (w, w)
    w_strides = w.stride() if fmt != "bitmask" else (0, 0, 1)
    grid = (block_expert.numel(), triton.cdiv(N, cfg.BLOCK_N), cfg.SPLIT_K)
    _routed_kernel[grid](
        x, w, meta, tile_offsets, starts, bias if bias is not None else w, y, sorted_ids, block_expert,
        T, N, K, x.stride(0), x.stride(1), *w_strides,
        meta.stride(0) if fmt != "dense" else 0, meta.stride(1) if fmt != "dense" else 0,
        tile_offsets.stride(0) if fmt == "bitmask" else 0, tile_offsets.stride(1) if fmt == "bitmask" else 0,
        bias.stride(0) if bias is not None else 0, y.stride(0), y.stride(1),
        SPARSE24=fmt == "2:4", BITMASK=fmt == "bitmask", HAS_BIAS=bias is not None, SPLIT_K=cfg.SPLIT_K,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        PREC=dot_precision(x.dtype, x.device), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.to(x.dtype)


def gemv_24_ready(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> bool:
    """True when _gemv_24_kernel can read these operands: x and values of one 16-bit dtype,
    d_in a multiple of 16, contiguous rows, x's rows on 8-byte boundaries (a group of 4 inputs
    is one 64-bit word), values' on 4 and meta's on 2."""
    K = x.shape[-1]
    aligned = lambda t, size: t.data_ptr() % size == 0 and all(s % (size // t.element_size()) == 0  # noqa: E731
                                                                  for s in t.stride()[:-1])
    return (x.dtype in (torch.float16, torch.bfloat16) and values.dtype == x.dtype and K % 16 == 0
            and x.stride(-1) == values.stride(-1) == meta.stride(-1) == 1
            and aligned(x, 8) and aligned(values, 4) and aligned(meta, 2))


def _gemv_24(x, expert, values, meta, bias, N: int, K: int, cfg: RoutedConfig) -> torch.Tensor:
    """Launch _gemv_24_kernel: one program per token, output tile and K split."""
    T = x.shape[0]
    if cfg.BLOCK_K % 16:
        raise ValueError("the 2:4 FMA decode path needs BLOCK_K divisible by 16")
    y = (torch.zeros(T, N, dtype=torch.float32, device=x.device) if cfg.SPLIT_K > 1
         else torch.empty(T, N, dtype=x.dtype, device=x.device))
    grid = (T, triton.cdiv(N, cfg.BLOCK_N), cfg.SPLIT_K)
    _gemv_24_kernel[grid](
        x, values, meta, bias if bias is not None else values, y, expert, N, K,
        x.stride(0), values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
        bias.stride(0) if bias is not None else 0, y.stride(0),
        HAS_BIAS=bias is not None, SPLIT_K=cfg.SPLIT_K, EVEN=N % cfg.BLOCK_N == 0 and K % cfg.BLOCK_K == 0,
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.to(x.dtype)


def _contiguous_bias(bias):
    return bias.contiguous() if bias is not None and bias.stride(-1) != 1 else bias


def routed_matmul_triton(x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, *,
                         config: RoutedConfig | None = None) -> torch.Tensor:
    """Triton version of `routed_matmul_reference` (same arguments; `config` for benchmarks)."""
    E, N, K = weight.shape
    return _routed(x, expert, "dense", (weight,), _contiguous_bias(bias), E, N, K, config)


def routed_matmul_24_triton(x: torch.Tensor, expert: torch.Tensor, values: torch.Tensor,
                            meta: torch.Tensor, bias: torch.Tensor | None = None, *,
                            config: RoutedConfig | None = None) -> torch.Tensor:
    """Triton version of `routed_matmul_24_reference`: 2:4 weights expanded in registers."""
    if values.stride(-1) != 1:
        values = values.contiguous()
    if meta.dtype != torch.uint8 or meta.stride(-1) != 1:
        raise ValueError("meta must be the uint8 tensor returned by compress_24")
    E, N, half = values.shape
    return _routed(x, expert, "2:4", (values, meta), _contiguous_bias(bias), E, N, 2 * half, config)


def routed_matmul_bitmask_triton(x: torch.Tensor, expert: torch.Tensor, values: torch.Tensor,
                                 mask: torch.Tensor, tile_offsets: torch.Tensor, starts: torch.Tensor,
                                 bias: torch.Tensor | None = None, *,
                                 config: RoutedConfig | None = None) -> torch.Tensor:
    """Triton version of `routed_matmul_bitmask_reference`: each tile's kept values gathered into
    a dense tile in registers, so the weights are read once, compressed."""
    E, N, B = mask.shape
    tiles = -(-8 * B // BITMASK_TILE.value)
    if mask.dtype != torch.uint8 or mask.stride(-1) != 1:
        raise ValueError("mask must be a contiguous [E, d_out, d_in/8] uint8 bitmask")
    if tile_offsets.shape != (E, N, tiles) or tile_offsets.dtype != torch.int32 or tile_offsets.stride(-1) != 1:
        raise ValueError(f"tile_offsets must be the contiguous [{E}, {N}, {tiles}] int32 of bitmask_offsets")
    if starts.shape != (E + 1,) or starts.dtype != torch.int64:
        raise ValueError(f"starts must be the [{E + 1}] int64 of bitmask_offsets")
    if values.dim() != 1 or values.stride(0) != 1:
        raise ValueError("values must be the contiguous 1-D kept values")
    return _routed(x, expert, "bitmask", (values, mask, tile_offsets, starts), _contiguous_bias(bias),
                   E, N, 8 * B, config)


def routed_matmul(x, expert, weight, bias=None):
    """Entry point SparseExpertLinear calls; dispatches to the Triton kernel on CUDA."""
    if use_triton(x):
        return routed_matmul_triton(x, expert, weight, bias)
    return routed_matmul_reference(x, expert, weight, bias)


def routed_matmul_24(x, expert, values, meta, bias=None):
    """Routed matmul on `compress_24` weights; Triton on CUDA, torch reference elsewhere."""
    if use_triton(x):
        return routed_matmul_24_triton(x, expert, values, meta, bias)
    return routed_matmul_24_reference(x, expert, values, meta, bias)


def routed_matmul_bitmask(x, expert, values, mask, tile_offsets, starts, bias=None):
    """Routed matmul on bitmask weights (`bitmask_offsets`); Triton on CUDA, torch reference elsewhere."""
    if use_triton(x):
        return routed_matmul_bitmask_triton(x, expert, values, mask, tile_offsets, starts, bias)
    return routed_matmul_bitmask_reference(x, expert, values, mask, tile_offsets, starts, bias)
