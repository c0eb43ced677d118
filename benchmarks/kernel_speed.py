"""Kernel microbenchmarks: each Triton kernel against its torch reference and a dense cuBLAS op.

    python benchmarks/kernel_speed.py [--out benchmarks/results] [--only hessian,obs,routed,decode-sweep] [--full]

GPU: median times (triton.testing.do_bench; CUDA graphs for decode, where host launch overhead
would otherwise dominate; CUDA events for calls longer than ~50 ms) at Llama-2 FFN shapes
(7B: 4096→11008, 11008→4096; 70B: 8192→28672, 28672→8192), achieved TFLOP/s or GB/s and the
fraction of the peaks measured in the same run (a large bf16 matmul, a large copy), and
pass/fail columns for the targets (never asserted):
  hessian  bf16 in: effective TFLOP/s (2·N·d² per batch) ≥ 60% of the dense XᵀX matmul's
           (and one fp32-input row at 7b_up: the tf32x3 path, no target)
  obs      batched Triton ≥ 10× faster than the torch reference looped over 16 experts and
           ≥ 3× faster than the batched torch reference
  prefill  routed matmul, 16 experts, bf16: ≤ 1.2× a dense F.linear of the same shape at 8192
           tokens; ≥ 70% of the dense GEMM's efficiency (same FLOPs) at 2048 tokens; beside it
           the grouped-GEMM alternative for dense experts (torch._grouped_mm, where this torch
           has it for the operands), its time as a ratio to the Triton kernel's (no target)
  decode   routed dense experts (1 and 16 tokens) within 1.1× of a dense GEMV's bandwidth;
           routed 2:4 ≥ 1.6× and routed bitmask ≥ 1.3× faster than routed dense
  decode-sweep  (GPU only, not in the default --only) one token at the default decode
           configuration and at BLOCK_N x SPLIT_K around it, kernel time under CUDA graphs,
           against a dense GEMV
Every GPU row also checks the kernel's result against its torch reference (column `err`: the
largest error relative to the largest reference value; OBS: the Frobenius-norm relative error
and the share of equal masks).
CPU: only the torch references (and dense torch ops) run, at shapes scaled down by 16, so the
table shows reference costs, not kernel speed. Results: a table on stdout and JSON in --out.
"""
import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from sparse_expansion.kernels import hessian, obs, routed_matmul as rm
from sparse_expansion.kernels.routed_grouped import grouped_mm_supported, routed_matmul_grouped

SHAPES = {  # name: (d_in, d_out) of a Llama-2 FFN linear
    "7b_up": (4096, 11008), "7b_down": (11008, 4096),
    "70b_up": (8192, 28672), "70b_down": (28672, 8192),
}
CPU_SCALE = 16
E_EXPERTS = 16


# ----------------------------------------------------------------------------- timing

class Timer:
    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.graphed = False  # whether the last call was timed under a CUDA graph
        self.graph_error = None  # why the last capture failed

    def sync(self):
        if self.gpu:
            torch.cuda.synchronize()

    def once(self, fn) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t) * 1e3

    def __call__(self, fn, graph: bool = False, max_runs: int = 20) -> float:
        """Median milliseconds of fn(); the first call (compilation, caches) is not counted."""
        self.graphed = False
        first = self.once(fn)
        if not self.gpu or first > 50:  # slow calls: a few timed runs within a time budget
            runs, budget = [], (1000 if not self.gpu else 3 * first)
            while len(runs) < max_runs and (not runs or sum(runs) < budget):
                runs.append(self.once(fn))
            return statistics.median(runs)
        import triton.testing as tt
        if graph:
            try:
                t = tt.do_bench_cudagraph(fn, rep=50, return_mode="median")
                self.graphed = True
                return t
            except Exception as e:  # not capturable (host sync inside): plain timing below
                self.graph_error = f"{type(e).__name__}: {str(e)[:200]}"
                torch.cuda.synchronize()
        return tt.do_bench(fn, warmup=10, rep=50, return_mode="median")


def measure_peaks(timer: Timer, dev: str) -> dict:
    gpu = dev == "cuda"
    n = 8192 if gpu else 1024
    dt = torch.bfloat16 if gpu else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    ms = timer(lambda: a @ b)
    flops = 2 * n ** 3 / ms / 1e9
    nbytes = (2 << 30) if gpu else (256 << 20)
    src = torch.empty(nbytes // 4, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms_copy = timer(lambda: dst.copy_(src))
    return {"matmul_tflops": flops, "matmul_dtype": str(dt).replace("torch.", ""),
            "matmul_n": n, "copy_gbps": 2 * nbytes / ms_copy / 1e6}


# ----------------------------------------------------------------------------- cases

def _row(kernel, case, shape, **kw):
    r = {"kernel": kernel, "case": case, "shape": shape, "triton_ms": None, "torch_ms": None,
         "dense_ms": None, "metric": "", "value": None, "frac_peak": None, "target": "",
         "ratio": None, "pass": None, "err": None, "note": ""}
    r.update(kw)
    return r


def _rel_err(y, ref) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


def bench_hessian(timer, dev, peaks, name, dims, scale):
    """One batch of N tokens over K clusters into fp32 Hessians [K, d, d], d = d_in: bf16 inputs
    (the model's dtype), and at 7b_up also fp32 inputs (tf32x3 dots)."""
    gpu = dev == "cuda"
    dtypes = ((torch.bfloat16, torch.float32) if name == "7b_up" else (torch.bfloat16,)) if gpu \
        else (torch.float32,)
    return [_bench_hessian_dtype(timer, dev, peaks, name, dims, scale, dt) for dt in dtypes]


def _bench_hessian_dtype(timer, dev, peaks, name, dims, scale, dt):
    gpu = dev == "cuda"
    d = dims[0] // scale
    N = 16384 if gpu else 2048
    K = (E_EXPERTS if d * d * E_EXPERTS * 4 <= (16 << 30) else 4) if gpu else 4
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, d, device=dev, dtype=dt, generator=g)
    labels = torch.randint(0, K, (N,), device=dev, generator=g)
    H = torch.zeros(K, d, d, device=dev)
    counts = torch.zeros(K, dtype=torch.int64, device=dev)
    flop = 2 * N * d * d  # the full XᵀX, as the dense baseline computes it
    xt = x.t()
    targeted = dt != torch.float32 or not gpu  # the fp32 GPU row has no target
    r = _row("hessian", f"K={K} N={N} {str(dt)[6:]}", f"{name} d={d}", metric="TFLOP/s",
             target=">=0.60 of dense XtX" if targeted else "")
    r["dense_ms"] = timer(lambda: F.linear(xt, xt))
    r["torch_ms"] = timer(lambda: hessian.accumulate_hessian_reference(H, counts, x, labels),
                          max_runs=5)
    if gpu:
        r["triton_ms"] = timer(lambda: hessian.accumulate_hessian_triton(H, counts, x, labels))
        r["value"] = flop / r["triton_ms"] / 1e9
        r["ratio"] = r["dense_ms"] / r["triton_ms"]  # = achieved / dense TFLOP/s
        if targeted:
            r["pass"] = r["ratio"] >= 0.6
        r["err"] = _hessian_error(x, labels, K, d)
        r["note"] = f"dense XtX {flop / r['dense_ms'] / 1e9:.0f} TFLOP/s"
    else:
        r["value"] = flop / r["torch_ms"] / 1e9
        r["note"] = "reference only"
    r["frac_peak"] = r["value"] / peaks["matmul_tflops"]
    return r


def _hessian_error(x, labels, K, d) -> float:
    """One accumulation from zero by the kernel against the reference (both mirrored)."""
    out = []
    for acc in (hessian.accumulate_hessian_triton, hessian.accumulate_hessian_reference):
        H = torch.zeros(K, d, d, device=x.device)
        acc(H, torch.zeros(K, dtype=torch.int64, device=x.device), x, labels)
        out.append(hessian.complete_hessian(H))
        _free(True)
    return _rel_err(*out)


def _random_hinv(E, C, dev, g):
    """A well-conditioned upper-triangular 'Cholesky factor of H⁻¹' (timing does not need a
    real Hessian, and factoring 16 of them would dominate the benchmark)."""
    U = torch.randn(E, C, C, device=dev, generator=g).triu_(1).mul_(0.3 / math.sqrt(C))
    U.diagonal(dim1=1, dim2=2).copy_(1 + torch.rand(E, C, device=dev, generator=g))
    return U


def bench_obs(timer, dev, peaks, name, dims, scale):
    """SparseGPT on 16 experts of one layer (W [16, d_out, d_in] fp32) at 50% and (7b_up) 2:4."""
    gpu = dev == "cuda"
    rows = []
    R, C = dims[1] // scale, dims[0] // scale
    E = E_EXPERTS
    g = torch.Generator(device=dev).manual_seed(1)
    W = torch.randn(E, R, C, device=dev, generator=g)
    Hinv = _random_hinv(E, C, dev, g)
    for case, kw in (("50%", dict(sparsity=0.5)), ("2:4", dict(prune_n=2, prune_m=4))):
        if case == "2:4" and name != "7b_up":
            continue
        r = _row("obs", f"E={E} {case}", f"{name} {R}x{C}", metric="speedup",
                 target=">=10x ref loop16, >=3x batched ref")
        out = {}
        r["torch_ms"] = timer(lambda: out.__setitem__("ref", obs.obs_prune_reference(W, Hinv, **kw)),
                              max_runs=1)
        # the reference looped over 16 experts: one expert measured, times 16
        loop16 = E * timer(lambda: obs.obs_prune_reference(W[:1], Hinv[:1], **kw), max_runs=1)
        r["note"] = f"ref loop16={loop16:.0f}ms (16x one expert); torch_ms = batched ref"
        if gpu:
            r["triton_ms"] = timer(lambda: out.__setitem__("tri", obs.obs_prune_triton(W, Hinv, **kw)),
                                   max_runs=3)
            r["ratio"] = r["value"] = loop16 / r["triton_ms"]
            batched = r["torch_ms"] / r["triton_ms"]
            r["pass"] = r["ratio"] >= 10 and batched >= 3
            (W_ref, keep_ref), (W_tri, keep_tri) = out["ref"], out["tri"]
            # Frobenius, not the largest error: a near-tie that rounding decides differently
            # flips a mask entry and moves the rest of that row (the GPU and CPU references
            # differ the same way, benchmarks/results/obs_diagnose_h200.json)
            r["err"] = float((W_tri - W_ref).norm() / W_ref.norm())
            r["note"] += (f"; {batched:.1f}x batched ref; masks equal "
                          f"{float((keep_ref == keep_tri).float().mean()):.4f}")
            del out, W_ref, W_tri
        else:
            r["note"] += "; reference only"
        rows.append(r)
    return rows


def _free(gpu):
    if gpu:
        torch.cuda.empty_cache()


def _make_24(W):
    E, N, K = W.shape
    groups = W.view(E, N, K // 4, 4)
    idx = groups.abs().topk(2, dim=-1, largest=False).indices
    return groups.scatter(-1, idx, 0).view(E, N, K)


def _bitmask(W):
    """W at 50% unstructured sparsity (the smaller half of each row) in the bitmask layout."""
    from sparse_expansion.methods.expansion.experts import pack_bits
    E, N, K = W.shape
    kept = W.abs() >= W.abs().float().median(dim=-1, keepdim=True).values.to(W.dtype)
    mask = pack_bits(kept).view(E, N, K // 8)
    return (W[kept], mask, *rm.bitmask_offsets(mask))


DECODE_GOALS = {"2:4": 1.6, "bitmask": 1.3}  # decode: x faster than routed dense experts


def bench_routed(timer, dev, peaks, name, dims, scale):
    """Top-1 routed matmul over 16 experts, dense, 2:4 and bitmask weights: prefill and decode."""
    gpu = dev == "cuda"
    rows = []
    dt = torch.bfloat16 if gpu else torch.float32
    esize = torch.finfo(dt).bits // 8
    K, N = dims[0] // scale, dims[1] // scale
    E = E_EXPERTS
    g = torch.Generator(device=dev).manual_seed(2)
    W = (torch.randn(E, N, K, device=dev, generator=g) / math.sqrt(K)).to(dt)
    weights = {"dense": (W,), "2:4": rm.compress_24(_make_24(W)), "bitmask": _bitmask(W)}
    kernels = {"dense": (rm.routed_matmul_reference, rm.routed_matmul_triton),
               "2:4": (rm.routed_matmul_24_reference, rm.routed_matmul_24_triton),
               "bitmask": (rm.routed_matmul_bitmask_reference, rm.routed_matmul_bitmask_triton)}
    bytes_per_expert = {fmt: sum(t.numel() * t.element_size() for t in w) // E for fmt, w in weights.items()}
    _free(gpu)
    W0 = W[0]
    for T in ((2048, 8192, 1, 16) if gpu else (256, 1, 16)):
        x = torch.randn(T, K, device=dev, generator=g).to(dt)
        expert = torch.randint(0, E, (T,), device=dev, generator=g)
        decode = T <= 16
        active = int(torch.unique(expert).numel())
        flop = 2 * T * K * N
        act_bytes = T * (K + N) * esize
        case = f"T={T} {'decode' if decode else 'prefill'} {str(dt)[6:]}"
        shape = f"{name} {K}->{N}"
        metric = "GB/s" if decode else "TFLOP/s"
        dense_ms = timer(lambda: F.linear(x, W0), graph=decode)
        r = {}
        for fmt, (reference, triton_fn) in kernels.items():
            row = r[fmt] = _row("routed", f"{case} {fmt}", shape, metric=metric)
            row["dense_ms"] = dense_ms
            out = {}
            row["torch_ms"] = timer(lambda: out.__setitem__("y", reference(x, expert, *weights[fmt])), max_runs=5)
            if fmt == "dense":
                dense_y = out["y"]  # the grouped GEMM's reference below
            if gpu:
                row["triton_ms"] = timer(lambda: triton_fn(x, expert, *weights[fmt]), graph=decode)
                row["err"] = _rel_err(triton_fn(x, expert, *weights[fmt]), out["y"])
            t = row["triton_ms"] if gpu else row["torch_ms"]
            if decode:
                row["value"] = (active * bytes_per_expert[fmt] + act_bytes) / t / 1e6
                row["frac_peak"] = row["value"] / peaks["copy_gbps"]
            else:
                row["value"] = flop / t / 1e9
                row["frac_peak"] = row["value"] / peaks["matmul_tflops"]
            if not gpu:
                row["note"] = "reference only"
        if not decode and grouped_mm_supported(x, W):  # the grouped-GEMM alternative for dense experts
            row = r["grouped"] = _row("routed", f"{case} dense, grouped GEMM", shape, metric=metric)
            row["torch_ms"] = timer(lambda: routed_matmul_grouped(x, expert, W), max_runs=5 if not gpu else 20)
            row["err"] = _rel_err(routed_matmul_grouped(x, expert, W), dense_y)
            row["value"] = flop / row["torch_ms"] / 1e9
            row["frac_peak"] = row["value"] / peaks["matmul_tflops"]
            baseline = r["dense"]["triton_ms"] if gpu else r["dense"]["torch_ms"]
            row["ratio"] = row["torch_ms"] / baseline
            row["note"] = f"ratio = time / routed dense {'Triton' if gpu else 'torch reference'} time"
        rd = r["dense"]
        if gpu and decode:
            for fmt, goal in DECODE_GOALS.items():
                r[fmt]["target"] = f">={goal}x faster than routed dense"
                r[fmt]["ratio"] = rd["triton_ms"] / r[fmt]["triton_ms"]
                r[fmt]["pass"] = r[fmt]["ratio"] >= goal
                r[fmt]["note"] = f"F.linear/this {dense_ms / r[fmt]['triton_ms']:.2f}"
            dense_gbps = (N * K * esize + act_bytes) / dense_ms / 1e6  # F.linear reads one matrix
            rd["target"] = "GEMV GB/s / this <= 1.1"
            rd["ratio"] = dense_gbps / rd["value"]
            rd["pass"] = rd["ratio"] <= 1.1
            rd["note"] = f"{active} experts; dense GEMV {dense_gbps:.0f} GB/s"
        elif gpu:
            limit = 1.2 if T >= 8192 else 1 / 0.7  # >= 70% of the dense GEMM's efficiency
            rd["target"] = f"<={limit:.2f}x dense F.linear time"
            rd["ratio"] = rd["triton_ms"] / dense_ms
            rd["pass"] = rd["ratio"] <= limit
            for fmt in DECODE_GOALS:
                r[fmt]["ratio"] = r[fmt]["triton_ms"] / dense_ms
                r[fmt]["note"] = "ratio = time / F.linear time"
        rows += list(r.values())
    return rows


DECODE_SWEEP = [(n, split) for n in (16, 32, 64) for split in (1, 4)]  # BLOCK_N x SPLIT_K


def bench_decode_sweep(timer, dev, peaks, name, dims, scale):
    """One token through one of 16 experts: the decode kernels at the configuration
    default_config picks and at BLOCK_N x SPLIT_K around it, timed under CUDA graphs (kernel
    time, no host launches), against a dense GEMV (F.linear) of one expert. On an H200 the
    default dense decode took 0.16-0.23 ms where the GEMV took 0.03-0.05 ms (decode_tokens_h200.json):
    this says whether a tile or a split closes that. GPU only."""
    if dev != "cuda":
        return []
    from dataclasses import replace
    K, N = dims
    E = E_EXPERTS
    g = torch.Generator(device=dev).manual_seed(5)
    W = (torch.randn(E, N, K, device=dev, generator=g) / math.sqrt(K)).to(torch.bfloat16)
    weights = {"dense": (W,), "2:4": rm.compress_24(_make_24(W)), "bitmask": _bitmask(W)}
    calls = {"dense": rm.routed_matmul_triton, "2:4": rm.routed_matmul_24_triton,
             "bitmask": rm.routed_matmul_bitmask_triton}
    x = torch.randn(1, K, device=dev, generator=g).to(torch.bfloat16)
    expert = torch.randint(0, E, (1,), device=dev, generator=g)
    gemv_ms = timer(lambda: F.linear(x, W[int(expert)]), graph=True)
    rows = []
    for fmt, w in weights.items():
        nbytes = sum(t.numel() * t.element_size() for t in w) // E
        gemv = fmt == "2:4" and rm.gemv_24_ready(x, *w)
        base = rm.default_config(1, E, N, K, fmt, x.device, False, 2, gemv)
        configs = [("default", None)] + [(f"n{n} split{k}", replace(base, BLOCK_N=n, SPLIT_K=k))
                                         for n, k in DECODE_SWEEP]
        reference = calls[fmt](x, expert, *w, config=base)
        for label, cfg in configs:
            row = _row("decode sweep", f"T=1 {fmt} {label}", f"{name} {K}->{N}", metric="GB/s", dense_ms=gemv_ms,
                       note=f"{cfg or base}")
            try:
                row["triton_ms"] = timer(lambda: calls[fmt](x, expert, *w, config=cfg), graph=True)
                if not timer.graphed:  # host launches included: say why
                    row["note"] += f"; NOT under a CUDA graph ({timer.graph_error})"
                row["err"] = _rel_err(calls[fmt](x, expert, *w, config=cfg), reference)
                row["value"] = (nbytes + 2 * (K + N)) / row["triton_ms"] / 1e6
                row["frac_peak"] = row["value"] / peaks["copy_gbps"]
                row["ratio"] = gemv_ms / row["triton_ms"]  # > 1: faster than the dense GEMV
                row["target"] = "ratio = GEMV time / this"
            except Exception as e:  # a tile the kernel refuses: recorded, the sweep goes on
                row["note"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- output

def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "PASS" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def print_table(rows):
    cols = [("kernel", 8), ("shape", 22), ("case", 26), ("triton_ms", 10), ("torch_ms", 10),
            ("dense_ms", 9), ("metric", 8), ("value", 9), ("frac_peak", 9), ("ratio", 7),
            ("pass", 5), ("err", 8), ("target", 30), ("note", 0)]
    print("  ".join(f"{c:<{w}}" if w else c for c, w in cols))
    for r in rows:
        cells = {c: (f"{r[c]:.1e}" if c == "err" and r.get(c) is not None else _fmt(r.get(c))) for c, _ in cols}
        print("  ".join(f"{cells[c]:<{w}}" if w else cells[c] for c, w in cols))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"))
    ap.add_argument("--only", default="hessian,obs,routed")
    ap.add_argument("--full", action="store_true", help="also OBS at the 70B shapes")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU mode: torch threads (default 1: on a busy 2-core machine OpenMP "
                         "barriers make small multi-threaded ops up to ~100x slower)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        torch.set_num_threads(args.threads)
    dev = "cuda" if gpu else "cpu"
    scale = 1 if gpu else CPU_SCALE
    timer = Timer(gpu)
    shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"# kernel microbenchmarks on {name} (torch {torch.__version__})")
    if not gpu:
        print(f"# CPU MODE: no GPU, so only the torch references and dense torch ops run, at "
              f"shapes scaled down by {CPU_SCALE}x, {torch.get_num_threads()} thread(s); no Triton "
              "timings. Run on a GPU for the kernel numbers and targets.")
    peaks = measure_peaks(timer, dev)
    print(f"# measured peaks: matmul {peaks['matmul_tflops']:.1f} TFLOP/s "
          f"({peaks['matmul_dtype']}, n={peaks['matmul_n']}), copy {peaks['copy_gbps']:.0f} GB/s")
    rows, errors = [], []
    os.makedirs(args.out, exist_ok=True)
    tag = "cpu" if not gpu else re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    path = os.path.join(args.out, f"kernels_{tag}.json")

    def save(done):  # after every shape, so a timeout keeps what was measured
        with open(path, "w") as f:
            json.dump({"device": name, "mode": "gpu" if gpu else "cpu-references-only",
                       "threads": torch.get_num_threads(), "shape_scale": 1 / scale,
                       "torch": torch.__version__, "triton": _triton_version(),
                       "python": platform.python_version(), "peaks": peaks,
                       "sections_done": done, "rows": rows, "errors": errors,
                       "created": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)

    benches = {"hessian": bench_hessian, "obs": bench_obs, "routed": bench_routed,
               "decode-sweep": bench_decode_sweep}
    done = []
    for key in args.only.split(","):
        sh = shapes
        if key in ("obs", "decode-sweep") and not args.full:  # 70B OBS: minutes of reference time
            sh = {k: v for k, v in shapes.items() if k.startswith("7b")}
        t0 = time.time()
        n0 = len(rows)
        for shape_name, dims in sh.items():
            try:
                rows += benches[key](timer, dev, peaks, shape_name, dims, scale)
            except Exception as e:  # keep going: one failure must not hide the other numbers
                errors.append(f"{key} {shape_name}: {type(e).__name__}: {str(e)[:500]}")
                traceback.print_exc()
            _free(gpu)
            save(done)
        done.append(key)
        print(f"# {key}: {time.time() - t0:.1f}s", flush=True)
        print_table(rows[n0:])
        sys.stdout.flush()
        save(done)
    for e in errors:
        print("# ERROR", e)
    print(f"# wrote {path}")
    return 1 if errors else 0


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
