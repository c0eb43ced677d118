"""Triton kernels against their torch references (CPU: Triton's interpreter; GPU: real kernels).

Shapes are small and awkward (not multiples of the block sizes); 16-bit tests use fp16 because
the interpreter computes bf16 dots wrongly: the bf16 cases (GPU_ONLY) run on a GPU only, and the
ahead-of-time compile test covers bf16 everywhere.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from sparse_expansion.kernels import hessian, obs, routed_matmul as rm
from sparse_expansion.kernels.hessian import accumulate_hessian_reference, accumulate_hessian_triton, complete_hessian
from sparse_expansion.kernels.obs import find_quant_grid, obs_prune_reference, obs_prune_triton
from sparse_expansion.kernels.routed_grouped import grouped_mm_supported, routed_matmul_grouped
from sparse_expansion.kernels.routed_matmul import (
    RoutedConfig, align_tokens, compress_24, decompress_24, routed_matmul_24_reference,
    routed_matmul_24_triton, routed_matmul_reference, routed_matmul_triton)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


GPU_ONLY = pytest.mark.skipif(DEV == "cpu", reason="bf16 dots are wrong under the interpreter")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- Hessian

def _spd(K, d, g):
    A = torch.randn(K, d, d, generator=g)
    return A @ A.transpose(1, 2) / d


@pytest.mark.parametrize("K,N,d,dtype,labelled", [
    (1, 37, 50, torch.float32, False),    # plain SparseGPT accumulation
    (5, 200, 150, torch.float16, True),   # two tiles per side, an empty cluster
    (4, 1, 33, torch.float32, True),      # a single token
    (3, 90, 20, torch.float32, True),     # d below the minimum block
    pytest.param(4, 300, 200, torch.bfloat16, True, marks=GPU_ONLY),  # the model dtype, on a GPU
])
def test_hessian_matches_reference(K, N, d, dtype, labelled):
    g = _gen(K * 1000 + N)
    x = torch.randn(N, d, generator=g).to(dtype)
    labels = torch.randint(0, K, (N,), generator=g) if labelled else None
    if labelled and K == 5:
        labels[labels == 2] = 4  # cluster 2 stays empty
    H0 = _spd(K, d, g)
    c0 = torch.randint(0, 7, (K,), generator=g)
    H_ref, c_ref = H0.clone(), c0.clone()
    H_tri, c_tri = H0.clone().to(DEV), c0.clone().to(DEV)
    accumulate_hessian_reference(H_ref, c_ref, x, labels)
    accumulate_hessian_triton(H_tri, c_tri, x.to(DEV), None if labels is None else labels.to(DEV))
    assert torch.equal(c_tri.cpu(), c_ref)
    if d > 128:  # the tile below the diagonal (128-wide tiles) is not written
        assert torch.equal(H_tri.cpu()[:, 128:, :128], H0[:, 128:, :128])
    H_tri, H_ref = complete_hessian(H_tri.cpu()), complete_hessian(H_ref)
    torch.testing.assert_close(H_tri, H_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(H_tri, H_tri.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hessian_preloaded_accumulator_matches_reference(monkeypatch, dtype):
    """The epilogue sm_90 runs (PRELOAD: the accumulator starts from H·scale/alpha), over two
    batches, against the reference; the interpreter's own blocks use the other epilogue."""
    interpreter_blocks = hessian._hessian_blocks
    monkeypatch.setattr(hessian, "_hessian_blocks",
                        lambda *a: dict(interpreter_blocks(*a), BLOCK=32, BLOCK_K=16, PRELOAD=True))
    g = _gen(11)
    K, d = 3, 70  # 3 tiles a side, the last one partial
    H_ref = _spd(K, d, g)
    c_ref = torch.tensor([0, 5, 2])
    H_tri, c_tri = H_ref.clone().to(DEV), c_ref.clone().to(DEV)
    for _ in range(2):
        x = torch.randn(45, d, generator=g).to(dtype)
        labels = torch.randint(0, K, (45,), generator=g)
        accumulate_hessian_reference(H_ref, c_ref, x, labels)
        accumulate_hessian_triton(H_tri, c_tri, x.to(DEV), labels.to(DEV))
    assert torch.equal(c_tri.cpu(), c_ref)
    torch.testing.assert_close(complete_hessian(H_tri.cpu()), complete_hessian(H_ref), rtol=1e-5, atol=1e-5)


SYNCING_OPS = {"nonzero", "bincount", "_local_scalar_dense", "masked_select", "unique", "_unique2",
               "repeat_interleave"}  # ops whose output size or value the host must wait for on a GPU


def test_hessian_accumulation_waits_for_nothing():
    """The wrapper around the Hessian kernel issues no op that makes the host wait for the GPU
    (before: bincount and nonzero on every call) and few ops at all; a label out of range fails."""
    g = _gen(21)
    K, d = 4, 40
    H, counts = torch.zeros(K, d, d, device=DEV), torch.zeros(K, dtype=torch.int64, device=DEV)
    x = torch.randn(50, d, generator=g).to(DEV)
    labels = torch.randint(0, K - 1, (50,), generator=g).to(DEV)  # the last cluster stays empty
    for lab in (labels, None):
        accumulate_hessian_triton(H, counts, x, lab)  # the tile pairs are made once per size
        ops = _aten_ops(lambda: accumulate_hessian_triton(H, counts, x, lab), (hessian._hessian_tile_kernel,))
        assert not SYNCING_OPS & set(ops) and len(ops) <= 9, ops
    with pytest.raises((RuntimeError, IndexError), match="out of bounds"):
        accumulate_hessian_triton(H, counts, x, torch.full((50,), K, device=DEV))


def test_hessian_running_average_over_batches():
    """Several batches from zero state give 2/n·XᵀX of all tokens, per cluster."""
    g = _gen(7)
    K, d = 3, 40
    xs = [torch.randn(2, 11, d, generator=g) for _ in range(3)]  # [batch, seq, d] inputs
    labs = [torch.randint(0, K, (22,), generator=g) for _ in range(3)]
    H = torch.zeros(K, d, d, device=DEV)
    counts = torch.zeros(K, dtype=torch.int64, device=DEV)
    for x, lab in zip(xs, labs):
        accumulate_hessian_triton(H, counts, x.to(DEV), lab.to(DEV))
    complete_hessian(H)
    X = torch.cat([x.reshape(-1, d) for x in xs])
    L = torch.cat(labs)
    for c in range(K):
        Xc = X[L == c]
        assert int(counts[c]) == Xc.shape[0]
        torch.testing.assert_close(H[c].cpu(), 2 / Xc.shape[0] * Xc.t() @ Xc, rtol=1e-5, atol=1e-5)


def test_hessian_empty_batch_is_a_no_op():
    H = torch.eye(16, device=DEV)[None].repeat(2, 1, 1)
    counts = torch.tensor([3, 0], device=DEV)
    accumulate_hessian_triton(H, counts, torch.zeros(0, 16, device=DEV),
                              torch.zeros(0, dtype=torch.long, device=DEV))
    assert counts.tolist() == [3, 0] and torch.equal(H[0].cpu(), torch.eye(16))


# ----------------------------------------------------------------------------- OBS

def _obs_problem(E, R, C, g, dtype=torch.float32):
    W = torch.randn(E, R, C, generator=g)
    X = torch.randn(E, 2 * C, C, generator=g)
    H = X.transpose(1, 2) @ X / (2 * C) + 0.01 * torch.eye(C)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    return W.to(dtype), Hinv


@pytest.mark.parametrize("E,R,C,sparsity,n,m,bits,blocksize,dtype", [
    (2, 37, 200, 0.5, 0, 0, None, 128, torch.float32),  # unstructured, partial 2nd block
    (1, 20, 72, 0.0, 2, 4, None, 128, torch.float32),   # 2:4
    (2, 19, 96, 0.0, 1, 3, None, 128, torch.float32),   # 1:3, blocksize rounded to 126
    (1, 33, 150, 0.6, 0, 0, 4, 128, torch.float32),     # unstructured + 4-bit grid
    (2, 21, 64, 0.0, 2, 4, 3, 128, torch.float32),      # 2:4 + 3-bit grid
    (3, 9, 100, 0.3, 0, 0, None, 32, torch.float16),    # small blocks, fp16 weights, E=3
    (2, 23, 200, 0.5, 0, 0, None, 16, torch.float32),   # two-level updates: super-blocks of 3 blocks, the last partial
    (1, 17, 144, 0.0, 2, 4, 4, 16, torch.float32),      # two-level updates, 2:4 + 4-bit grid
])
def test_obs_matches_reference(E, R, C, sparsity, n, m, bits, blocksize, dtype):
    g = _gen(E * 100 + R + C)
    W, Hinv = _obs_problem(E, R, C, g, dtype)
    grid = find_quant_grid(W.float(), bits) if bits else None
    W, Hinv = W.to(DEV), Hinv.to(DEV)
    if grid is not None:
        grid = obs.QuantGrid(grid.scale.to(DEV), grid.zero.to(DEV), grid.maxq)
    W_ref, keep_ref = obs_prune_reference(W, Hinv, sparsity, n, m, grid, blocksize)
    W_tri, keep_tri = obs_prune_triton(W, Hinv, sparsity, n, m, grid, blocksize)
    assert keep_tri.dtype == torch.bool and W_tri.dtype == torch.float32
    W_ref, keep_ref, W_tri, keep_tri = W_ref.cpu(), keep_ref.cpu(), W_tri.cpu(), keep_tri.cpu()
    assert not W_tri[~keep_tri].any()
    if n:
        kept_per_group = keep_tri.reshape(E, R, C // m, m).sum(-1)
        assert (kept_per_group == m - n).all()
    # The interpreter repeats torch's fp32 arithmetic exactly; a GPU may contract to FMAs, so a
    # score at the threshold can flip (and the rest of that row diverges): allow a few there.
    same_rows = (keep_tri == keep_ref).all(-1)  # [E, R]
    if DEV == "cpu":
        assert same_rows.all()
    else:
        assert (keep_tri != keep_ref).float().mean() <= 1e-3 and same_rows.float().mean() >= 0.9
    torch.testing.assert_close(W_tri[same_rows], W_ref[same_rows], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prune", [obs_prune_reference, obs_prune_triton])
def test_obs_in_place_updates_the_callers_copy_and_gives_the_same_result(prune):
    """SparseGPT hands the solve its own fp32 working copy: updated in place, with no second
    [E, R, C] fp32 copy (a 70B down_proj's 16 experts: 15 GB each)."""
    W, Hinv = _obs_problem(2, 13, 40, _gen(7), torch.float32)
    W, Hinv = W.to(DEV), Hinv.to(DEV)
    copied, keep = prune(W, Hinv, 0.5, 0, 0, None, 16)
    mine = W.clone()
    updated, keep_in_place = prune(mine, Hinv, 0.5, 0, 0, None, 16, in_place=True)
    assert updated.data_ptr() == mine.data_ptr() and copied.data_ptr() != W.data_ptr()
    assert torch.equal(updated, copied) and torch.equal(keep_in_place, keep)
    with pytest.raises(ValueError, match="contiguous fp32"):
        prune(W.half(), Hinv, 0.5, in_place=True)


def test_obs_quantizer_rounds_half_steps_to_even_as_the_reference():
    """Weights exactly halfway between two levels of the grid round as torch.round does (half to
    even) in the kernel too. An identity Hinv: no error propagates, every weight stays on its
    half-step until it is quantized."""
    E, R, C = 1, 4, 40
    W = ((torch.arange(R * C, dtype=torch.float32).reshape(E, R, C) % 14 - 7) + 0.5) * 0.25
    grid = obs.QuantGrid(torch.full((E, R, 1), 0.25, device=DEV), torch.full((E, R, 1), 8.0, device=DEV), 15)
    Hinv = torch.eye(C).expand(E, C, C).contiguous().to(DEV)
    W_ref, _ = obs_prune_reference(W.to(DEV), Hinv, 0.0, 0, 0, grid, 128)
    W_tri, _ = obs_prune_triton(W.to(DEV), Hinv, 0.0, 0, 0, grid, 128)
    expected = 0.25 * (torch.clamp(torch.round(W / 0.25) + 8, 0, 15) - 8)
    assert torch.equal(W_ref.cpu(), expected) and torch.equal(W_tri.cpu(), expected)


@pytest.mark.parametrize("E,R,C,i1,count", [(2, 37, 200, 0, 128), (1, 150, 300, 128, 100), (3, 5, 70, 32, 32)])
def test_trailing_update_matches_reference(E, R, C, i1, count):
    """The lazy update of the columns after a block: awkward row counts, a partial block, a
    trailing width that is not a multiple of the tile."""
    g = _gen(E + R + C)
    W, Hinv = _obs_problem(E, R, C, g)
    err = torch.randn(E, R, 128, generator=g)
    want = W.clone()
    obs.trailing_update_reference(want, err, Hinv, i1, count)
    got = W.clone().to(DEV)
    obs.trailing_update_triton(got, err.to(DEV), Hinv.to(DEV), i1, count)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(got.cpu()[:, :, :i1 + count], W[:, :, :i1 + count])  # earlier columns untouched


def test_far_width_groups_blocks_up_to_a_quarter_of_the_columns():
    assert obs.far_width(128, 4096) == 512 and obs.far_width(128, 28672) == 512
    assert obs.far_width(128, 1536) == 384 and obs.far_width(128, 576) == 128 and obs.far_width(16, 200) == 48


def test_obs_rejects_bad_shapes():
    W, Hinv = _obs_problem(1, 4, 16, _gen(0))
    with pytest.raises(ValueError):
        obs_prune_triton(W.to(DEV), Hinv[:, :8, :8].to(DEV), 0.5)
    with pytest.raises(ValueError):
        obs_prune_triton(W.to(DEV), Hinv.to(DEV), 0.0, 5, 4)


def test_bracket_kth_value_is_kthvalue(monkeypatch):
    """The GPU's unstructured threshold: exactly torch.kthvalue, by a sampled bracket (random
    rows, ties, NaNs), and by kthvalue itself when the sample misleads the bracket."""
    g = _gen(5)
    rows = {"random": torch.randn(3, 1000, generator=g) ** 2,
            "ties": torch.randint(0, 5, (2, 1001), generator=g).float(),
            "nan": torch.randn(2, 999, generator=g)}
    rows["nan"][0, :50] = float("nan")
    misleading = torch.full((2, 1024), 7.0)
    misleading[:, ::16] = 0.0  # the strided sample sees only zeros
    rows["misleading"] = misleading
    calls = []
    kthvalue = torch.kthvalue
    monkeypatch.setattr(torch, "kthvalue", lambda *a, **kw: calls.append(1) or kthvalue(*a, **kw))
    fell_back = {}
    for name, score in rows.items():
        for k in (1, 7, score.shape[1] // 2, score.shape[1]):
            calls.clear()
            got = obs.bracket_kth_value(score, k, sample=64)
            fell_back[name, k] = bool(calls)
            want = kthvalue(score, k, dim=1, keepdim=True).values
            torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    assert not any(v for (name, _), v in fell_back.items() if name == "random")  # the bracket found it
    assert fell_back["misleading", 512]
    crowded = torch.randn(2, 2100, generator=g)  # sample 256: the sort's fixed width is 80% of a row
    crowded[:, :1900] = 0.5  # 90% of the row inside the bracket: more than the width holds
    for score, falls_back in ((torch.randn(2, 2100, generator=g), False), (crowded, True)):
        calls.clear()
        got = obs.bracket_kth_value(score, 1000, sample=256)
        assert bool(calls) == falls_back
        assert torch.equal(got, kthvalue(score, 1000, dim=1, keepdim=True).values)


def test_bracket_kth_value_waits_once():
    """Per 128-column block of SparseGPT on a GPU, the threshold makes the host wait once (the
    bracket's check), not three times (a boolean gather and a max that sized the sort before)."""
    score = torch.randn(2, 8 * 64 + 5, generator=_gen(6)) ** 2
    ops = _aten_ops(lambda: obs.bracket_kth_value(score, 200, sample=64))
    assert [op for op in ops if op in SYNCING_OPS] == ["_local_scalar_dense"], ops


# ----------------------------------------------------------------------------- routed matmul

def _make_24(W):
    E, N, K = W.shape
    groups = W.reshape(E, N, K // 4, 4)
    idx = groups.abs().float().topk(2, dim=-1, largest=False).indices
    return groups.scatter(-1, idx, 0).reshape(E, N, K)


ROUTED_CASES = [  # T, E, d_out, d_in, dtype, bias, config
    (50, 5, 70, 96, torch.float32, True, None),      # an empty expert (1), fp32
    (1, 3, 40, 36, torch.float16, False, None),      # a single token (decode)
    (9, 3, 40, 36, torch.float16, True, None),       # decode, tokens sharing experts
    (33, 4, 45, 100, torch.float16, True, RoutedConfig(16, 32, 32, SPLIT_K=2)),  # split-K
    (40, 6, 24, 64, torch.float16, True, RoutedConfig(32, 16, 64)),  # all tokens on one expert
    pytest.param(300, 4, 130, 200, torch.bfloat16, True, None, marks=GPU_ONLY),    # bf16 prefill
    pytest.param(2100, 16, 200, 136, torch.bfloat16, False, None, marks=GPU_ONLY),  # 16 experts
    pytest.param(7, 16, 200, 136, torch.bfloat16, False, None, marks=GPU_ONLY),     # bf16 decode
]


def _routed_inputs(T, E, N, K, dtype, bias, seed):
    g = _gen(seed)
    x = torch.randn(T, K, generator=g).to(dtype)
    expert = torch.randint(0, E, (T,), generator=g)
    if E >= 4:
        expert[expert == 1] = 2
    if E == 6:
        expert.fill_(4)
    W = (torch.randn(E, N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(E, N, generator=g).to(dtype) if bias else None
    return x, expert, W, b


def _dev(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("T,E,N,K,dtype,bias,config", ROUTED_CASES)
def test_routed_matmul_matches_reference(T, E, N, K, dtype, bias, config):
    x, expert, W, b = _routed_inputs(T, E, N, K, dtype, bias, T + E + N)
    ref = routed_matmul_reference(x.float(), expert, W.float(), None if b is None else b.float())
    y = routed_matmul_triton(*_dev(x, expert, W, b), config=config)
    assert y.dtype == dtype and y.shape == (T, N)
    torch.testing.assert_close(y.float().cpu(), ref, **_tol(dtype))


GROUPED_CASES = [  # T, E, d_out, d_in, dtype, bias: the grouped GEMM runs on the CPU (torch's own)
    (50, 5, 70, 96, torch.float32, True),      # an empty expert (1)
    (1, 3, 40, 48, torch.float16, False),      # a single token
    (40, 6, 24, 64, torch.bfloat16, True),     # bf16, every token on one expert (_routed_inputs)
    (300, 16, 136, 200, torch.bfloat16, False),  # 16 experts, the CUDA path's alignment (8s)
]


@pytest.mark.parametrize("T,E,N,K,dtype,bias", GROUPED_CASES)
def test_grouped_routed_matmul_matches_reference(T, E, N, K, dtype, bias):
    """`routed_matmul_grouped` (one torch._grouped_mm over the tokens sorted by expert) gives the
    reference's result, with no op that makes the host wait for a GPU."""
    x, expert, W, b = _dev(*_routed_inputs(T, E, N, K, dtype, bias, 3 * T + E + N))
    if not grouped_mm_supported(x, W):
        pytest.skip("this torch or device has no grouped GEMM for these operands")
    ref = routed_matmul_reference(x.float(), expert, W.float(), None if b is None else b.float())
    y = routed_matmul_grouped(x, expert, W, b)
    assert y.dtype == dtype and y.shape == (T, N)
    torch.testing.assert_close(y.float(), ref, **_tol(dtype))
    ops = _aten_ops(lambda: routed_matmul_grouped(x, expert, W, b))
    assert not SYNCING_OPS & set(ops), ops
    assert not grouped_mm_supported(x[:, :-1].contiguous(), W[:, :, :-1])  # d_in of no whole 16 bytes


@pytest.mark.parametrize("T,E,N,K,dtype,bias,config", ROUTED_CASES)
def test_routed_matmul_24_matches_reference(T, E, N, K, dtype, bias, config):
    x, expert, W, b = _routed_inputs(T, E, N, K, dtype, bias, 2 * T + E + N)
    values, meta = compress_24(_make_24(W))
    ref = routed_matmul_24_reference(x.float(), expert, values.float(), meta,
                                     None if b is None else b.float())
    y = routed_matmul_24_triton(*_dev(x, expert, values, meta, b), config=config)
    assert y.dtype == dtype and y.shape == (T, N)
    torch.testing.assert_close(y.float().cpu(), ref, **_tol(dtype))


GEMV_24_CASES = [  # T <= 16, d_in a multiple of 16: one token per program on the FMA units (BLOCK_M 1)
    (1, 3, 40, 48, torch.float16, False, None),      # d_out, d_in not multiples of the tile: masked
    (9, 3, 40, 80, torch.bfloat16, True, None),      # bf16 (no tl.dot: the interpreter computes it right)
    (5, 2, 64, 256, torch.bfloat16, True, RoutedConfig(1, 32, 64, SPLIT_K=2)),  # whole tiles, split-K
    (16, 4, 32, 128, torch.float16, True, RoutedConfig(1, 32, 128)),             # whole tiles
]


@pytest.mark.parametrize("T,E,N,K,dtype,bias,config", GEMV_24_CASES)
def test_routed_matmul_24_decode_on_fma_units_matches_reference(T, E, N, K, dtype, bias, config):
    x, expert, W, b = _routed_inputs(T, E, N, K, dtype, bias, 4 * T + E + N)
    values, meta = compress_24(_make_24(W))
    assert rm.gemv_24_ready(x, values, meta)
    cfg = config or rm.default_config(T, E, N, K, "2:4", torch.device(DEV), DEV == "cpu", 2)
    assert cfg.BLOCK_M == 1, cfg
    ref = routed_matmul_24_reference(x.float(), expert, values.float(), meta, None if b is None else b.float())
    y = routed_matmul_24_triton(*_dev(x, expert, values, meta, b), config=config)
    assert y.dtype == dtype and y.shape == (T, N)
    torch.testing.assert_close(y.float().cpu(), ref, **_tol(dtype))


def test_routed_matmul_24_decode_falls_back_to_dense_tiles_for_operands_it_cannot_read():
    """Rows of x that do not start on 8 bytes, fp32, or d_in not a multiple of 16 take the
    dense-tile kernel (still correct); asking for the FMA path on them is a clear error."""
    T, E, N, K = 3, 2, 24, 48
    x, expert, W, b = _routed_inputs(T, E, N, K + 1, torch.float16, True, 5)
    x, W = x[:, 1:], W[..., 1:]  # rows of K + 1 elements: every row but the first is misaligned
    values, meta = compress_24(_make_24(W))
    assert not rm.gemv_24_ready(x, values, meta)
    assert not rm.gemv_24_ready(x.float(), values.float(), meta)
    assert rm.default_config(T, E, N, K, "2:4", torch.device("cpu"), True, 2, gemv=False).BLOCK_M == 16
    ref = routed_matmul_24_reference(x.float(), expert, values.float(), meta, b.float())
    y = routed_matmul_24_triton(*_dev(x, expert, values, meta, b))
    torch.testing.assert_close(y.float().cpu(), ref, **_tol(torch.float16))
    with pytest.raises(ValueError, match="FMA decode path"):
        routed_matmul_24_triton(*_dev(x, expert, values, meta, b), config=RoutedConfig(1, 32, 64))
    with pytest.raises(ValueError, match="FMA decode path"):
        routed_matmul_triton(*_dev(x.contiguous(), expert, W.contiguous(), b), config=RoutedConfig(1, 32, 64))


BITMASK_CASES = [  # T, E, d_out, d_in (a multiple of 8, not of the 64-column tile), dtype, bias, config
    (50, 5, 70, 96, torch.float32, True, None),      # an empty expert, fp32
    (1, 3, 40, 72, torch.float16, False, None),      # decode
    (9, 3, 40, 136, torch.float16, True, None),      # decode, tokens sharing experts
    (33, 4, 45, 200, torch.float16, True, RoutedConfig(16, 32, 64, SPLIT_K=2)),  # split-K
    pytest.param(300, 4, 130, 200, torch.bfloat16, True, None, marks=GPU_ONLY),   # bf16 prefill
    pytest.param(7, 16, 200, 136, torch.bfloat16, False, None, marks=GPU_ONLY),   # bf16 decode
]


def _exact_bitmask(W):
    """W [E, N, K] in the bitmask layout: (values, mask, tile_offsets, starts)."""
    from sparse_expansion.methods.expansion.experts import compress
    E, N, K = W.shape
    parts = compress(W)
    mask = parts["mask"].view(E, N, K // 8)
    return (parts["values"], mask, *rm.bitmask_offsets(mask))


def _bitmask(W):
    """W made unstructured-sparse (~60%, one all-zero row), and its bitmask layout."""
    W = W.masked_fill(torch.rand(W.shape, generator=_gen(W.shape[-1])) < 0.6, 0)
    W[0, 3] = 0
    return (W, *_exact_bitmask(W))


@pytest.mark.parametrize("T,E,N,K,dtype,bias,config", BITMASK_CASES)
def test_routed_matmul_bitmask_matches_reference(T, E, N, K, dtype, bias, config):
    x, expert, W, b = _routed_inputs(T, E, N, K, dtype, bias, 3 * T + E + N)
    W, values, mask, tile_offsets, starts = _bitmask(W)
    ref = rm.routed_matmul_bitmask_reference(x.float(), expert, values.float(), mask, tile_offsets, starts,
                                             None if b is None else b.float())
    torch.testing.assert_close(ref, routed_matmul_reference(x.float(), expert, W.float(),
                                                            None if b is None else b.float()))
    y = rm.routed_matmul_bitmask_triton(*_dev(x, expert, values, mask, tile_offsets, starts, b), config=config)
    assert y.dtype == dtype and y.shape == (T, N)
    torch.testing.assert_close(y.float().cpu(), ref, **_tol(dtype))


def test_bitmask_offsets_count_the_kept_weights_before_each_tile():
    W = torch.zeros(2, 3, 136)
    W[0, 0, [0, 5, 63, 64, 100]] = 1.0   # row 0: 3 in tile 0, 2 in tile 1
    W[0, 2, 130] = 2.0                   # row 1 empty; row 2: 1 in tile 2
    W[1, 1, 7] = 3.0
    values, mask, tile_offsets, starts = _exact_bitmask(W)
    assert tile_offsets[0].tolist() == [[0, 3, 5], [5, 5, 5], [5, 5, 5]]
    assert tile_offsets[1].tolist() == [[0, 0, 0], [0, 1, 1], [1, 1, 1]]
    assert starts.tolist() == [0, 6, 7]
    with pytest.raises(ValueError, match="tile_offsets"):
        rm.routed_matmul_bitmask_triton(torch.zeros(1, 136), torch.zeros(1, dtype=torch.long), values, mask,
                                        tile_offsets[:, :, :2], starts)


@pytest.mark.parametrize("T,E,N,K,path", [
    (1, 1, 16, 4096, "decode, automatic split-K"),  # one program: split until 2 per SM (CPU: 1 SM)
    (65, 4, 45, 104, "prefill, BLOCK_M 64"),         # the first T past decode, ~16 tokens per expert
    (2048, 4, 40, 96, "prefill, BLOCK_M 128"),        # >= 128 tokens per expert
])
@pytest.mark.parametrize("fmt", ["dense", "2:4", "bitmask"])
def test_routed_matmul_runs_the_configs_a_gpu_gets(T, E, N, K, path, fmt):
    """The configurations default_config picks off the interpreter (which otherwise always gets
    its own), run here on the shapes that select them."""
    cfg = rm.default_config(T, E, N, K, fmt, torch.device("cpu"), interpret=False)
    assert {"decode, automatic split-K": cfg.SPLIT_K > 1, "prefill, BLOCK_M 64": cfg.BLOCK_M == 64,
            "prefill, BLOCK_M 128": cfg.BLOCK_M == 128}[path], cfg
    x, expert, W, b = _routed_inputs(T, E, N, K, torch.float16, True, T)
    if fmt == "2:4":
        values, meta = compress_24(_make_24(W))
        ref = routed_matmul_24_reference(x.float(), expert, values.float(), meta, b.float())
        y = routed_matmul_24_triton(*_dev(x, expert, values, meta, b), config=cfg)
    elif fmt == "bitmask":
        W, *parts = _bitmask(W)
        ref = routed_matmul_reference(x.float(), expert, W.float(), b.float())
        y = rm.routed_matmul_bitmask_triton(*_dev(x, expert, *parts, b), config=cfg)
    else:
        ref = routed_matmul_reference(x.float(), expert, W.float(), b.float())
        y = routed_matmul_triton(*_dev(x, expert, W, b), config=cfg)
    torch.testing.assert_close(y.float().cpu(), ref, **_tol(torch.float16))


def test_routed_matmul_runs_the_fp32_configs_a_gpu_gets():
    """fp32 operands get half the K tile and 64-row prefill tiles (shared memory and registers,
    see gpu_configs); those configurations run here against the reference."""
    T, E, N, K = 300, 2, 40, 96
    cfg = rm.default_config(T, E, N, K, "dense", torch.device("cpu"), interpret=False, element_size=4)
    assert (cfg.BLOCK_M, cfg.BLOCK_K) == (64, 32), cfg
    x, expert, W, b = _routed_inputs(T, E, N, K, torch.float32, True, T)
    y = routed_matmul_triton(*_dev(x, expert, W, b), config=cfg)
    torch.testing.assert_close(y.cpu(), routed_matmul_reference(x, expert, W, b), **_tol(torch.float32))


@pytest.mark.skipif(DEV != "cpu", reason="the interpreter's limitation")
def test_bf16_dots_are_refused_under_the_interpreter():
    x, expert, W, b = _routed_inputs(5, 2, 8, 16, torch.bfloat16, False, 0)
    with pytest.raises(RuntimeError, match="bf16"):
        routed_matmul_triton(x, expert, W)
    H, counts = torch.zeros(1, 16, 16), torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="bf16"):
        accumulate_hessian_triton(H, counts, x)


def test_routed_matmul_no_tokens():
    W = torch.randn(2, 8, 16, device=DEV)
    y = routed_matmul_triton(torch.zeros(0, 16, device=DEV),
                             torch.zeros(0, dtype=torch.long, device=DEV), W)
    assert y.shape == (0, 8)


def test_align_tokens_groups_by_expert():
    expert = torch.tensor([3, 0, 3, 3, 1, 0, 3, 3, 3])
    ids, block_expert = align_tokens(expert, E=5, block_m=4)
    T = expert.numel()
    assert ids.numel() == block_expert.numel() * 4
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        tok = [t for t in ids[4 * b:4 * b + 4].tolist() if t < T]
        if e < 0:
            assert not tok
            continue
        assert tok and all(int(expert[t]) == e for t in tok)
        seen += tok
    assert sorted(seen) == list(range(T))
    assert block_expert.tolist()[:4] == [0, 1, 3, 3]


def test_token_blocks_put_each_token_in_its_own_block():
    ids, block_expert = rm.token_blocks(torch.tensor([2, 0, 2]), block_m=4)
    assert ids.tolist() == [0, 3, 3, 3, 1, 3, 3, 3, 2, 3, 3, 3]
    assert block_expert.tolist() == [2, 0, 2] and block_expert.dtype == torch.int64


def _aten_ops(fn, skip_kernels=()):
    """The aten ops fn() runs (a decoding step's small launches on a GPU), leaving out what the
    @triton.jit kernels in skip_kernels do when launched (the interpreter's own copies)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    ops, counting = [], [True]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if counting[0] and not func.is_view:  # views launch nothing
                ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def quiet(launch):
        def run(*a, **k):
            counting[0] = False
            try:
                return launch(*a, **k)
            finally:
                counting[0] = True
        return run

    originals = [(k, k.run) for k in skip_kernels]
    for kernel, run in originals:
        kernel.run = quiet(run)
    try:
        with Count():
            fn()
    finally:
        for kernel, run in originals:
            kernel.run = run
    return ops


def test_a_decoding_step_issues_few_torch_ops():
    """One token through a PCA router and the routed kernels: the router is 5 ops (the mean's
    subtraction, two products, the distances, argmin) and the wrappers none besides the kernel
    but the split-K output's zeroing and cast (before: ~10 for the router, 4 to build the token
    blocks, 1 to narrow the expert ids)."""
    from sparse_expansion.methods.expansion.router import Router
    g = _gen(9)
    d, N, E = 64, 40, 3
    router = Router(torch.randn(E, 8, generator=g), torch.randn(d, generator=g), torch.randn(d, 8, generator=g))
    x = torch.randn(1, d, generator=g).to(DEV, torch.float16)
    router.to(DEV).assign(x)  # the centroid norms are kept from the first call on
    assert _aten_ops(lambda: router.assign(x)) == ["sub", "mm", "mm", "sub", "argmin"]
    expert = router.assign(x)
    W = torch.randn(E, N, d, generator=g).to(DEV, torch.float16)
    values, meta = compress_24(_make_24(W))
    kernels = (rm._routed_kernel, rm._gemv_24_kernel)
    for call in (lambda: routed_matmul_triton(x, expert, W),
                 lambda: routed_matmul_24_triton(x, expert, values, meta)):
        call()  # the decode ids are made once per token count
        ops = _aten_ops(call, kernels)
        assert ops in (["empty"], ["zeros", "_to_copy"]), ops  # y; with split-K, y in fp32 and its cast


def test_compress_24_round_trip_and_format():
    g = _gen(3)
    W = _make_24(torch.randn(2, 5, 36, generator=g))  # 9 groups a row: odd, meta padded
    W[0, 0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # one nonzero in a group
    W[0, 0, 4:8] = 0                                   # none
    values, meta = compress_24(W)
    assert values.shape == (2, 5, 18) and meta.shape == (2, 5, 5) and meta.dtype == torch.uint8
    assert torch.equal(decompress_24(values, meta), W)
    assert torch.equal(decompress_24(*compress_24(W.half())), W.half())


def test_compress_24_rejects_dense_weights():
    W = torch.ones(1, 2, 8)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        compress_24(W)
    with pytest.raises(ValueError, match="divisible by 4"):
        compress_24(torch.zeros(1, 2, 6))


# ----------------------------------------------------------------------------- dispatch

@pytest.mark.parametrize("mode,expect", [("auto", "torch" if DEV == "cpu" else "triton"),
                                         ("torch", "torch"), ("triton", "triton")])
def test_dispatchers_pick_backend(monkeypatch, mode, expect):
    monkeypatch.setenv("SPARSE_EXPANSION_KERNELS", mode)
    calls = []

    def spy(name):
        return lambda *a, **k: calls.append(name)

    for mod, ref, tri in [(hessian, "accumulate_hessian_reference", "accumulate_hessian_triton"),
                          (obs, "obs_prune_reference", "obs_prune_triton"),
                          (rm, "routed_matmul_reference", "routed_matmul_triton"),
                          (rm, "routed_matmul_24_reference", "routed_matmul_24_triton"),
                          (rm, "routed_matmul_bitmask_reference", "routed_matmul_bitmask_triton")]:
        monkeypatch.setattr(mod, ref, spy("torch"))
        monkeypatch.setattr(mod, tri, spy("triton"))
    t = torch.zeros(2, 4, 4, device=DEV)
    hessian.accumulate_hessian(t, torch.zeros(2, dtype=torch.long, device=DEV), t[0])
    obs.obs_prune(t, t, 0.5)
    rm.routed_matmul(t[0], torch.zeros(4, dtype=torch.long, device=DEV), t)
    rm.routed_matmul_24(t[0], torch.zeros(4, dtype=torch.long, device=DEV), t, t)
    rm.routed_matmul_bitmask(t[0], torch.zeros(4, dtype=torch.long, device=DEV), t, t, t, t)
    assert calls == [expect] * 5


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    from sparse_expansion.kernels._triton_utils import check_launch
    if DEV != "cpu":
        pytest.skip("CPU-only check")

    def not_interpreted():  # a plain function stands for a compiled (non-interpreted) kernel
        pass
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        check_launch(not_interpreted, torch.zeros(1))


# ----------------------------------------------------------------------------- compilation

SHARED_LIMIT = {80: 166912, 86: 101376, 90: 232448}  # bytes of shared memory a block may use


def test_kernels_compile_as_the_jit_does_for_sm80_sm86_sm90():
    """Every kernel variant lowers to a cubin for sm_80, sm_86 and sm_90 with bf16 inputs (and for
    sm_80 and sm_86 with fp32 inputs: tf32x3 and ieee dots, see dot_precision), no GPU,
    specialised as the JIT specialises an LLM-shaped launch (16-divisible pointers and sizes, unit
    strides constant); no register spills, its shared memory fits the device, and every kernel
    that calls tl.dot (but for "ieee" dots) issues tensor-core instructions (mma.sync / wgmma) in
    its main loop.

    Runs in a subprocess without TRITON_INTERPRET (the interpreter's objects cannot be compiled).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    targets = ((80, "bf16"), (86, "bf16"), (90, "bf16"), (80, "fp32"), (86, "fp32"))
    procs = [subprocess.Popen([sys.executable, "-m", "sparse_expansion.kernels._compile", str(cc),
                               "--dtype", dtype], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cc, dtype in targets]
    for (cc, dtype), p in zip(targets, procs):
        out, err = p.communicate(timeout=600)
        assert p.returncode in (0, 1), f"sm_{cc} {dtype} compile crashed:\n{err[-3000:]}"
        report = json.loads(out)
        assert not report["failed"], json.dumps(report["results"], indent=1)[-3000:]
        for name, r in report["results"][f"sm_{cc}"].items():
            assert "cubin" in r["stages"] and r["registers"] > 0, name
            assert r["shared"] <= SHARED_LIMIT[cc], (cc, name, r["shared"])
            assert r["spill_stores"] == r["spill_loads"] == 0, (cc, name, r["spill_stores"])
            assert 0 < r["loop_instructions"] < r["instructions"], (cc, name)  # the main loop's SASS was found
            if r["dot"] and r["precision"] != "ieee":  # ... and the tensor-core instructions sit in it (HMMA / HGMMA)
                assert r["tensor_core"] > 0 and r["loop_tensor_core"] > 0, (cc, name)


@GPU_ONLY
@pytest.mark.parametrize("fmt", ["bitmask", "dense", "2:4"])
def test_a_decoding_step_replays_in_a_cuda_graph(fmt):
    """A one-token SparseExpertLinear forward (router, routed kernel) syncs nothing with the host,
    so a model can decode under CUDA graphs: captured once, replayed on new inputs, it gives the
    eager results (whose experts differ from token to token)."""
    from sparse_expansion.methods.expansion.experts import SparseExpertLinear
    from sparse_expansion.methods.expansion.router import Router
    g = _gen(12)
    d, N, E = 256, 192, 4
    router = Router(torch.randn(E, 16, generator=g), torch.randn(d, generator=g), torch.randn(d, 16, generator=g))
    layer = SparseExpertLinear(router, _make_24(torch.randn(E, N, d, generator=g)).to(torch.bfloat16)).to(DEV)
    if fmt != "bitmask":
        layer.to_dense() if fmt == "dense" else layer.to_24()
    x = torch.randn(1, d, generator=g).to(DEV, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, makes the decode ids and centroid norms
        layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    experts = set()
    for seed in range(6):
        x.copy_(torch.randn(1, d, generator=_gen(100 + seed)).to(DEV, torch.bfloat16))
        graph.replay()
        torch.testing.assert_close(y, layer(x))
        experts.add(int(router.assign(x)))
    assert len(experts) > 1
