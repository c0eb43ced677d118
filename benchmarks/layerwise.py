"""Layer-wise benchmark: the cost and quality of pruning one FFN linear with SparseGPT (1 cluster)
and Sparse Expansion (16 clusters), stage by stage, against a one-cluster-at-a-time reference.

    python benchmarks/layerwise.py --quick                   # CPU, scaled-down shapes, minutes
    python benchmarks/layerwise.py --device cuda --full      # Llama-2 shapes, 128x2048 tokens
    python benchmarks/layerwise.py --inputs smollm2 --layer 14   # inputs captured from SmolLM2

What runs is the library code the driver runs, called stage by stage with timers around it
(the composition mirrors `router.fit_router`, `ExpansionMethod.prune_group` and
`solvers.sparsegpt`; tests/test_layerwise.py checks that it gives their results):
  pca      router.fit_pca on the calibration tokens (Sparse Expansion only)
  kmeans   Router.project, kmeans_torch (or cuML), Router.assign of the calibration tokens
  hessian  kernels.hessian.accumulate_hessian batch by batch: SparseGPT's full Hessian (the
           driver's collector); for Sparse Expansion all cluster Hessians with labels, the full
           H as Σ n_c·H_c / N, then the small-cluster rule (shrink / damping; empty clusters
           take the full H)
  inverse  solvers.inverse_hessian_factor on all clusters at once
  obs      kernels.obs.obs_prune on all clusters' weight copies at once
The reference does the same computation one cluster at a time, as SparseGPT's own code does for
a single matrix: PCA (textbook SVD of the centred tokens on CPU; on CUDA, where that SVD would
take minutes, the library's covariance eigh: --reference-pca), Lloyd's k-means with a Python
loop over clusters for the centroid update, then for each cluster in turn its masked Hessian
(SparseGPT's add_batch running average over the same batches), its inverse factor and its OBS
pass with the torch reference (obs_prune_reference) on that single matrix. Each stage reports
reference / library time. `--no-reference` skips it (e.g. for a short GPU session).

On CPU both sides run torch code (the library's Triton kernels need CUDA), so the ratios there
measure what batching the clusters saves, not the kernels.

Also measured: peak memory of each pipeline (CUDA max allocated; on CPU the peak RSS, reset
through /proc/self/clear_refs), relative reconstruction error ‖WX − ŴX‖²/‖WX‖² on HELD-OUT
tokens of the same distribution (Sparse Expansion: tokens routed by its router) for magnitude,
Wanda, SparseGPT and Sparse Expansion, and routed inference (SparseExpertLinear forward,
including routing; 2:4 experts compressed by SparseExpertLinear.to_24, i.e. compress_24 +
routed_matmul_24) against a dense
nn.Linear of the same shape at 1, 16, 256 and 4096 tokens.

Targets (printed as pass/fail, never asserted):
  CPU --quick  Sparse Expansion (16 clusters) >= 2x faster than the reference, same error
  GPU 7B       one FFN linear into 16 experts < 10 s end to end
  inference    routed forward <= 1.2x the dense nn.Linear time at 4096 tokens
Results: tables on stdout, JSON and CSV (benchmarks/results/layerwise_<cpu|gpu>.json/.csv),
PNG plots when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparse_expansion import solvers
from sparse_expansion.driver import PruneConfig
from sparse_expansion.expansion import solve_hessians
from sparse_expansion.experts import SparseExpertLinear
from sparse_expansion.kernels.hessian import accumulate_hessian
from sparse_expansion.kernels.obs import obs_prune, obs_prune_reference
from sparse_expansion.kernels.routed_matmul import compress_24, routed_matmul_24
from sparse_expansion.router import Router, choose_backend, fit_pca, kmeans_cuml, kmeans_torch
from sparse_expansion.sparsity import Sparsity

SHAPES = {  # name: (d_in, d_out) of a Llama-2 FFN linear (gate/up_proj and down_proj)
    "7b_up": (4096, 11008), "7b_down": (11008, 4096),
    "13b_up": (5120, 13824), "13b_down": (13824, 5120),
    "70b_up": (8192, 28672), "70b_down": (28672, 8192),
}
STAGES = ("pca", "kmeans", "hessian", "inverse", "obs")
TOKEN_COUNTS = (1, 16, 256, 4096)
SAME_ERROR_TOL = 0.02  # "same reconstruction error": library error <= reference error x 1.02
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class BenchConfig:
    device: str = "cpu"
    shapes: tuple[str, ...] = tuple(SHAPES)
    scale: int = 16                 # Llama dimensions divided by this (1 = real shapes)
    inputs: str = "synthetic"       # or "smollm2": inputs of model.model.layers[layer].mlp
    layer: int = 14
    nsamples: int = 64              # calibration windows ...
    seqlen: int = 256               # ... of this many tokens
    batch_windows: int = 8          # windows per accumulation batch (the driver's --batch-size)
    heldout_tokens: int = 4096
    clusters: int = 16
    pca_factor: int = 32
    kmeans_restarts: int = 10
    kmeans_backend: str = "auto"
    small_clusters: str = "shrink"  # the driver's default; or "damping" (the paper's behaviour)
    shrink_tokens: float = PruneConfig.shrink_tokens
    percdamp: float = 0.01
    blocksize: int = 128
    sparsities: tuple[str, ...] = ("0.5",)
    dtype: str = "float32"          # activations and inference weights (solvers work in fp32)
    reference: bool = True
    reference_pca: str = "svd"      # "svd" (textbook) or "eigh" (the library's algorithm)
    token_counts: tuple[int, ...] = TOKEN_COUNTS
    bench_budget_s: float = 0.5     # timing budget per inference measurement
    repeats: int = 3                # pruning runs shorter than repeat_below_s are repeated ...
    repeat_below_s: float = 1.0     # ... and the fastest kept
    seed: int = 0
    progress: bool = True
    plots: bool = True
    out: str | None = RESULTS

    @property
    def gpu(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# --quick divides the dimensions and the calibration tokens by 16: tokens per input dimension (and
# per cluster and dimension) are those of --full, so the per-cluster Hessians are as well-posed
QUICK = dict(scale=16, nsamples=64, seqlen=256, heldout_tokens=4096, sparsities=("0.5", "2:4"))
FULL = dict(scale=1, nsamples=128, seqlen=2048, heldout_tokens=16384, sparsities=("0.5", "2:4"))


# ----------------------------------------------------------------------------- timing, memory

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Seconds per stage, summed over repeated entries (the reference enters once per cluster)."""

    def __init__(self, device):
        self.device = device
        self.seconds = {s: 0.0 for s in STAGES}

    @contextmanager
    def __call__(self, stage: str):
        _sync(self.device)
        t = time.perf_counter()
        yield
        _sync(self.device)
        self.seconds[stage] += time.perf_counter() - t


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give glibc's cached free memory back to the OS, so that the next peak RSS counts the
    section's own allocations rather than reusing memory freed earlier."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a code section, in MiB above what was in use when it started.

    CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak RSS (VmHWM), reset by writing
    5 to /proc/self/clear_refs (Linux >= 4.0); RSS includes allocator caching, so it is an upper
    bound of the tensors alive (glibc's cache is trimmed first). Where the reset is impossible the
    figure is None.
    """

    def __init__(self, device):
        self.gpu = torch.device(device).type == "cuda"
        self.device = device
        self.extra_mb = self.total_mb = None

    def __enter__(self):
        if self.gpu:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.start = _proc_status_kb("VmRSS") * 1024
            except (OSError, TypeError):
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.gpu:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_status_kb("VmHWM")
            peak = None if self.start is None or hwm is None else hwm * 1024
        if peak is not None:
            self.total_mb = peak / 2 ** 20
            self.extra_mb = max(0, peak - self.start) / 2 ** 20
        return False


def time_calls(fns: dict, device, budget_s: float = 0.5, max_rounds: int = 30) -> dict:
    """Median milliseconds per call of each fn, measured in interleaved rounds (one timing of
    each fn per round) so that a busy machine slows them alike and their ratios stay fair. The
    first call (caches, compilation) is not counted; short calls are timed in groups so that the
    timer and the device sync do not dominate."""
    inner = {}
    for name, fn in fns.items():
        fn()
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        inner[name] = max(1, min(1000, int(2e-3 / max(time.perf_counter() - t, 1e-7))))
    runs = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(max_rounds):
        if r >= 3 and time.perf_counter() - start >= budget_s * len(fns):
            break
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            _sync(device)
            runs[name].append((time.perf_counter() - t) / inner[name])
    return {name: statistics.median(v) * 1e3 for name, v in runs.items()}


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower() \
        or "can't allocate memory" in str(e).lower()


def _free(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- inputs

@dataclass
class LayerInputs:
    name: str
    weight: torch.Tensor          # [d_out, d_in] fp32
    calib: list[torch.Tensor]     # accumulation batches [b, d_in] in the run's dtype
    heldout: torch.Tensor         # [M, d_in], same distribution, not used for calibration
    source: str


class SyntheticActivations:
    """Random activations with a decaying spectrum, cluster structure and outlier channels.

    Tokens come from a mixture of `clusters` Gaussians in an r-dimensional latent space (scales
    (1+i)^-0.75, so PCA finds the leading directions) mapped to d features by a fixed random
    matrix, plus isotropic noise. Each cluster has its own mean (in the leading directions) and
    its own stretch of every latent direction, so clusters have different Hessians; cluster
    sizes are unequal; a few feature channels are 8x larger, like LLM outlier features.
    """

    def __init__(self, d: int, clusters: int = 16, seed: int = 0, device="cpu"):
        g = torch.Generator(device=device).manual_seed(seed)
        r = min(d, max(16, d // 4))
        self.d, self.device = d, device
        self.spectrum = (1.0 + torch.arange(r, device=device)) ** -0.75
        self.mix = torch.randn(r, d, generator=g, device=device) / math.sqrt(r)
        self.means = 2.5 * torch.randn(clusters, r, generator=g, device=device) * self.spectrum
        self.stretch = torch.exp(0.5 * torch.randn(clusters, r, generator=g, device=device)) * self.spectrum
        self.weights = torch.softmax(0.7 * torch.randn(clusters, generator=g, device=device), 0)
        self.channel = torch.ones(d, device=device)
        outliers = torch.randperm(d, generator=g, device=device)[:max(1, d // 128)]
        self.channel[outliers] = 8.0
        self.noise = 0.05

    def sample(self, n: int, seed: int, dtype: torch.dtype, chunk: int = 16384) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = torch.empty(n, self.d, dtype=dtype, device=self.device)
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            lab = torch.multinomial(self.weights, m, replacement=True, generator=g)
            z = self.means[lab] + self.stretch[lab] * torch.randn(m, self.spectrum.numel(), generator=g,
                                                                  device=self.device)
            x = z @ self.mix + self.noise * torch.randn(m, self.d, generator=g, device=self.device)
            out[s:s + m] = (x * self.channel).to(dtype)
        return out


def scaled_shape(name: str, scale: int) -> tuple[int, int]:
    """(d_in, d_out) divided by `scale`, rounded down to multiples of 4 (2:4 needs d_in % 4 == 0)."""
    return tuple(max(4, (v // scale) // 4 * 4) for v in SHAPES[name])


def synthetic_layer(cfg: BenchConfig, name: str, shape_seed: int) -> LayerInputs:
    d_in, d_out = scaled_shape(name, cfg.scale)
    dev = cfg.device
    src = SyntheticActivations(d_in, 16, cfg.seed + 1000 * shape_seed, dev)
    per_batch = cfg.batch_windows * cfg.seqlen
    total = cfg.nsamples * cfg.seqlen
    calib = list(src.sample(total, cfg.seed + 1, cfg.torch_dtype).split(per_batch))
    heldout = src.sample(cfg.heldout_tokens, cfg.seed + 2, cfg.torch_dtype)
    g = torch.Generator(device=dev).manual_seed(cfg.seed + 3 + shape_seed)
    W = torch.randn(d_out, d_in, generator=g, device=dev) / math.sqrt(d_in)
    label = name if cfg.scale == 1 else f"{name}/{cfg.scale}"
    return LayerInputs(label, W, calib, heldout, "synthetic")


class _Stop(Exception):
    pass


@torch.no_grad()
def smollm2_layers(cfg: BenchConfig) -> list[LayerInputs]:
    """Inputs of model.model.layers[cfg.layer].mlp.{gate_proj, down_proj} of the embedded SmolLM2:
    calibration windows from the Wikipedia train split, held-out windows from its test split."""
    from sparse_expansion.data import calibration_windows, evaluation_windows
    from sparse_expansion.models import load_model
    model, tok = load_model("smollm2", dtype=cfg.torch_dtype, device=cfg.device)
    calib_ids = calibration_windows(tok, "wiki", cfg.nsamples, cfg.seqlen, cfg.seed)
    test_ids = evaluation_windows(tok, "wiki", cfg.seqlen, max_windows=math.ceil(cfg.heldout_tokens / cfg.seqlen))
    mlp = model.model.layers[cfg.layer].mlp
    linears = {"gate": mlp.gate_proj, "down": mlp.down_proj}
    store: dict[str, list[torch.Tensor]] = {k: [] for k in linears}

    def grab(key):
        def hook(_m, args):
            store[key].append(args[0].reshape(-1, args[0].shape[-1]).detach().clone())
            if key == "down":
                raise _Stop  # nothing after this layer's down_proj is needed
        return hook

    hooks = [m.register_forward_pre_hook(grab(k)) for k, m in linears.items()]
    try:
        captured = {}
        for part, ids in (("calib", calib_ids), ("heldout", test_ids)):
            for k in store:
                store[k].clear()
            for batch in ids.split(cfg.batch_windows):
                try:
                    model(batch.to(cfg.device), use_cache=False)
                except _Stop:
                    pass
            captured[part] = {k: list(v) for k, v in store.items()}
    finally:
        for h in hooks:
            h.remove()
    out = []
    for k, m in linears.items():
        held = torch.cat(captured["heldout"][k])[:cfg.heldout_tokens]
        out.append(LayerInputs(f"smollm2_L{cfg.layer}_{k}", m.weight.detach().float().clone(),
                               captured["calib"][k], held, "smollm2"))
    del model
    return out


# ----------------------------------------------------------------------------- library pipeline

@dataclass
class PruneRun:
    W_hat: torch.Tensor               # [K, d_out, d_in] fp32
    router: Router | None
    seconds: dict
    total_s: float
    peak_extra_mb: float | None = None
    peak_total_mb: float | None = None
    H_full: torch.Tensor | None = None    # [1, C, C] the layer's Hessian (library runs; Wanda uses it)
    H_c: torch.Tensor | None = None       # [K, C, C] cluster Hessians, for the in-sample error
    cluster_sizes: list[int] = field(default_factory=list)
    damping: list[float] = field(default_factory=list)
    calib_error: float | None = None
    kmeans_backend: str | None = None


def inverse_factor(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(Hinv, dead, damping) of solvers.inverse_hessian_factor, whether it returns a tuple or a
    HessianFactor (the library's API has had both)."""
    f = solvers.inverse_hessian_factor(H, percdamp)
    return tuple(f) if isinstance(f, tuple) else (f.Hinv, f.dead, f.damping)


def prune_library(W: torch.Tensor, batches: list[torch.Tensor], sparsity: Sparsity, clusters: int,
                  cfg: BenchConfig) -> PruneRun:
    """The driver's computation for one linear, stage by stage: SparseGPT when clusters == 1
    (driver.Method), Sparse Expansion otherwise (ExpansionMethod.prune_group)."""
    dev = cfg.device
    clock = StageClock(dev)
    t0 = time.perf_counter()
    C = W.shape[1]
    router, backend = None, None
    if clusters == 1:
        with clock("hessian"):  # driver.HessianStats: the running full Hessian, batch by batch
            H_full = torch.zeros(1, C, C, dtype=torch.float32, device=dev)
            n_full = torch.zeros(1, dtype=torch.long, device=dev)
            for xb in batches:
                accumulate_hessian(H_full, n_full, xb)
        H_c, H_solve, counts = H_full, H_full, n_full
    else:
        batches = [xb.float() for xb in batches]  # expansion.ClusterStats keeps fp32 rows
        with clock("pca"):
            x = torch.cat(batches)  # ClusterStats.next_pass
            mean = basis = None
            if cfg.pca_factor:
                mean, basis = fit_pca(x, max(1, C // cfg.pca_factor))
        with clock("kmeans"):  # router.fit_router after the PCA
            k = basis.shape[1] if basis is not None else C
            router = Router(torch.zeros(clusters, k), mean, basis).to(dev)
            z = router.project(x)
            backend = choose_backend(cfg.kmeans_backend, dev)
            km = kmeans_cuml if backend == "cuml" else kmeans_torch
            centroids, _ = km(z, clusters, cfg.seed, cfg.kmeans_restarts)
            router.centroids.copy_(centroids)
            labels = router.assign(x)
            del z, x
        with clock("hessian"):  # ClusterStats._accumulate + the small-cluster rule
            H_c = torch.zeros(clusters, C, C, dtype=torch.float32, device=dev)
            counts = torch.zeros(clusters, dtype=torch.long, device=dev)
            start = 0
            for xb in batches:
                accumulate_hessian(H_c, counts, xb, labels[start:start + xb.shape[0]])
                start += xb.shape[0]
            H_full = torch.einsum("k,kij->ij", counts.to(H_c.dtype), H_c)[None] / start  # Σ n_c·H_c / N
            H_solve = solve_hessians(H_c, counts, H_full, cfg.small_clusters, cfg.shrink_tokens)
    with clock("inverse"):  # solvers.inverse_hessian_factor (once per group in the driver)
        Hinv, dead, damping = inverse_factor(H_solve, cfg.percdamp)
    del H_solve
    with clock("obs"):  # solvers.sparsegpt given the factor
        Wk = W.float().expand(clusters, *W.shape).contiguous()
        Wk[dead[:, None, :].expand_as(Wk)] = 0.0
        W_hat, _ = obs_prune(Wk, Hinv, sparsity.rate if not sparsity.structured else 0.0,
                             sparsity.n, sparsity.m, None, cfg.blocksize)
        del Wk, Hinv
    _sync(dev)
    total = time.perf_counter() - t0
    return PruneRun(W_hat, router, clock.seconds, total, H_full=H_full, H_c=H_c, cluster_sizes=counts.tolist(),
                    damping=damping, kmeans_backend=backend)


def calibration_error(W: torch.Tensor, run: PruneRun) -> float:
    """In-sample error as the driver reports it: Σ_c n_c·tr(ΔW_c H_c ΔW_cᵀ) / (N·tr(W H Wᵀ))."""
    num, _ = solvers.error_terms(W[None], run.W_hat, run.H_c)
    full = solvers.error_terms(W[None], W[None], run.H_full)[1][0]
    counts = torch.tensor(run.cluster_sizes, dtype=num.dtype, device=num.device)
    return float((counts * num).sum() / (counts.sum() * full))


# ----------------------------------------------------------------------------- reference pipeline

def reference_pca(x: torch.Tensor, components: int, method: str = "svd") -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, basis [d, components]) of x [N, d]. "svd": textbook PCA, the SVD of the centred
    tokens (scikit-learn's svd_solver='full'); "eigh": eigenvectors of the covariance, the
    library's algorithm (PCA does not depend on the clusters; for GPU-sized inputs, where an SVD
    of 262144 x 11008 tokens would take minutes)."""
    x = x.float()
    mean = x.mean(0)
    xc = x - mean
    if method == "svd":
        basis = torch.linalg.svd(xc, full_matrices=False)[2][:components].t()
    elif method == "eigh":
        basis = torch.linalg.eigh((xc.t() @ xc).double() / x.shape[0])[1][:, -components:].flip(1).float()
    else:
        raise ValueError(f"reference PCA {method!r}: use svd or eigh")
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    return mean, basis * signs


def reference_kmeans(z: torch.Tensor, k: int, seed: int = 0, restarts: int = 10, max_iter: int = 300,
                     tol: float = 1e-4) -> torch.Tensor:
    """Lloyd's k-means one cluster at a time: cdist assignment, then each centroid as the mean of
    its points in a Python loop. Greedy k-means++ seeding (2 + log k candidates per step), best of
    `restarts` by inertia, scikit-learn's stopping rule; an empty cluster keeps its centroid."""
    z = z.float()
    n = z.shape[0]
    gen = torch.Generator(device=z.device).manual_seed(seed)
    threshold = tol * float(z.var(0, unbiased=False).mean())
    best, best_inertia = None, math.inf
    for _ in range(restarts):
        centers = z[torch.randint(n, (1,), generator=gen, device=z.device)]
        closest = torch.cdist(z, centers).square()[:, 0]
        for _ in range(1, k):
            cand = torch.multinomial(closest / closest.sum(), 2 + int(math.log(k)), replacement=True, generator=gen)
            d = torch.cdist(z, z[cand]).square()
            pick = int(torch.minimum(closest[:, None], d).sum(0).argmin())
            centers = torch.cat([centers, z[cand[pick]][None]])
            closest = torch.minimum(closest, d[:, pick])
        for _ in range(max_iter):
            labels = torch.cdist(z, centers).argmin(1)
            new = centers.clone()
            for c in range(k):
                members = z[labels == c]
                if members.shape[0]:
                    new[c] = members.mean(0)
            shift = float((new - centers).square().sum())
            centers = new
            if shift <= threshold:
                break
        inertia = float(torch.cdist(z, centers).min(1).values.square().sum())
        if inertia < best_inertia:
            best, best_inertia = centers, inertia
    return best


def reference_hessian(batches: list[torch.Tensor], labels: list[torch.Tensor] | None, c: int
                      ) -> tuple[torch.Tensor, int]:
    """SparseGPT's add_batch over the tokens of cluster c (all tokens when labels is None)."""
    C = batches[0].shape[1]
    H = torch.zeros(C, C, dtype=torch.float32, device=batches[0].device)
    n = 0
    for i, xb in enumerate(batches):
        xc = (xb if labels is None else xb[labels[i] == c]).float()
        m = xc.shape[0]
        if m == 0:
            continue
        H *= n / (n + m)
        n += m
        xc = math.sqrt(2 / n) * xc
        H += xc.t() @ xc
    return H, n


def prune_reference(W: torch.Tensor, batches: list[torch.Tensor], sparsity: Sparsity, clusters: int,
                    cfg: BenchConfig) -> PruneRun:
    """The same computation one cluster at a time (see the module docstring)."""
    dev = cfg.device
    clock = StageClock(dev)
    t0 = time.perf_counter()
    C = W.shape[1]
    router, labels = None, None
    with clock("hessian"):
        H_full, n_total = reference_hessian(batches, None, 0)
    if clusters > 1:
        with clock("pca"):
            x = torch.cat(batches).float()
            mean, basis = (reference_pca(x, max(1, C // cfg.pca_factor), cfg.reference_pca) if cfg.pca_factor
                           else (None, None))
        with clock("kmeans"):
            z = x if basis is None else (x - mean) @ basis
            centroids = reference_kmeans(z, clusters, cfg.seed, cfg.kmeans_restarts)
            flat = torch.cdist(z, centroids).argmin(1)
            labels = list(flat.split([b.shape[0] for b in batches]))
            router = Router(centroids, mean, basis).to(dev)
            del x, z
    W_hat = torch.empty(clusters, *W.shape, dtype=torch.float32, device=dev)
    sizes, damping = [], []
    for c in range(clusters):
        with clock("hessian"):
            if clusters == 1:
                H, n = H_full, n_total
            else:
                H, n = reference_hessian(batches, labels, c)
                if n == 0:
                    H = H_full
                elif cfg.small_clusters == "shrink" and n < n_total:
                    H = (n * H + cfg.shrink_tokens * H_full) / (n + cfg.shrink_tokens)
        with clock("inverse"):
            Hinv, dead, damp = inverse_factor(H[None], cfg.percdamp)
        with clock("obs"):
            Wc = W.float().clone()[None]
            Wc[dead[:, None, :].expand_as(Wc)] = 0.0
            Wc, _ = obs_prune_reference(Wc, Hinv, sparsity.rate if not sparsity.structured else 0.0,
                                        sparsity.n, sparsity.m, None, cfg.blocksize)
            W_hat[c] = Wc[0]
        sizes.append(n)
        damping += damp
        del H, Hinv, Wc
    _sync(dev)
    return PruneRun(W_hat, router, clock.seconds, time.perf_counter() - t0, cluster_sizes=sizes,
                    damping=damping, kmeans_backend="reference" if clusters > 1 else None)


# ----------------------------------------------------------------------------- quality, inference

@torch.no_grad()
def heldout_error(W: torch.Tensor, x: torch.Tensor, forward, chunk: int = 4096) -> float:
    """Σ‖Wx − f(x)‖² / Σ‖Wx‖² over held-out tokens x [M, d_in] (fp32 math, fp64 sums)."""
    num = den = 0.0
    Wf = W.float()
    for xb in x.split(chunk):
        xb = xb.float()
        y = F.linear(xb, Wf)
        num += float((y - forward(xb).float()).double().square().sum())
        den += float(y.double().square().sum())
    return num / max(den, 1e-30)


def bench_inference(layer: LayerInputs, run: PruneRun, sparsity: Sparsity, cfg: BenchConfig) -> list[dict]:
    """Routed forward (routing included) against a dense nn.Linear at each token count."""
    dev, dt = cfg.device, cfg.torch_dtype
    d_out, d_in = layer.weight.shape
    dense = nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dt)
    dense.weight.data.copy_(layer.weight)
    experts = SparseExpertLinear(run.router, run.W_hat.to(dt))
    router = run.router
    experts24 = None
    if sparsity.structured and (sparsity.n, sparsity.m) == (2, 4):
        if hasattr(SparseExpertLinear, "to_24"):  # the module's own compressed format
            experts24 = SparseExpertLinear(run.router, run.W_hat.to(dt)).to_24()
        else:
            values, meta = compress_24(run.W_hat.to(dt))
            experts24 = lambda x: routed_matmul_24(x, router.assign(x), values, meta)  # noqa: E731
    rows = []
    with torch.no_grad():
        for T in cfg.token_counts:
            reps = math.ceil(T / layer.heldout.shape[0])
            x = layer.heldout.repeat(reps, 1)[:T].to(dt).contiguous()
            r = {"shape": layer.name, "d_in": d_in, "d_out": d_out, "sparsity": str(sparsity),
                 "tokens": T, "experts": experts.experts,
                 "active_experts": int(torch.unique(router.assign(x)).numel())}
            fns = {"dense_ms": lambda: dense(x), "routing_ms": lambda: router.assign(x),
                   "routed_ms": lambda: experts(x)}
            if experts24 is not None:
                fns["routed24_ms"] = lambda: experts24(x)
            r.update({"routed24_ms": None, **time_calls(fns, dev, cfg.bench_budget_s)})
            r["routed_ratio"] = r["routed_ms"] / r["dense_ms"]
            r["routing_share"] = r["routing_ms"] / r["routed_ms"]
            r["routed24_ratio"] = None if experts24 is None else r["routed24_ms"] / r["dense_ms"]
            rows.append(r)
    return rows


# ----------------------------------------------------------------------------- one layer

def _prune_row(layer: LayerInputs, sparsity: Sparsity, method: str, impl: str, run: PruneRun,
               err: float) -> dict:
    d_out, d_in = layer.weight.shape
    return {"shape": layer.name, "d_in": d_in, "d_out": d_out, "sparsity": str(sparsity), "method": method,
            "impl": impl, "clusters": run.W_hat.shape[0],
            "calib_tokens": sum(b.shape[0] for b in layer.calib),
            "heldout_tokens": layer.heldout.shape[0],
            **{f"{s}_s": run.seconds[s] for s in STAGES}, "total_s": run.total_s,
            "peak_extra_mb": run.peak_extra_mb, "peak_total_mb": run.peak_total_mb,
            "heldout_error": err, "calib_error": run.calib_error,
            "cluster_sizes": run.cluster_sizes, "damping_max": max(run.damping) if run.damping else None,
            "kmeans_backend": run.kmeans_backend}


def _measure(fn, cfg) -> PruneRun:
    with PeakMemory(cfg.device) as mem:
        run = fn()
    run.peak_extra_mb, run.peak_total_mb = mem.extra_mb, mem.total_mb
    return run


def _ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b


def speedup_row(lib: dict, ref: dict) -> dict:
    """Reference time / library time per stage (None where the stage did not run)."""
    row = {k: lib[k] for k in ("shape", "d_in", "d_out", "sparsity", "method", "clusters")}
    row["impl"] = "speedup"
    for s in STAGES:
        a, b = ref[f"{s}_s"], lib[f"{s}_s"]
        row[f"{s}_s"] = _ratio(a, b) if (a > 0 or b > 0) else None
    row["total_s"] = _ratio(ref["total_s"], lib["total_s"])
    row["peak_extra_mb"] = _ratio(ref["peak_extra_mb"], lib["peak_extra_mb"])
    row["heldout_error"] = _ratio(ref["heldout_error"], lib["heldout_error"])
    return row


def bench_layer(layer: LayerInputs, sparsity: Sparsity, cfg: BenchConfig, results: dict, step) -> None:
    """Everything measured on one layer at one sparsity; appends to results, step() per task."""
    sparsity.check_columns(layer.weight.shape[1], layer.name)
    dev = cfg.device
    W = layer.weight.to(dev).float()
    runs, fails = {}, results["failures"]

    def attempt(task, fn):
        try:
            return fn()
        except Exception as e:  # one failure (OOM above all) must not hide the other numbers
            kind = "OOM" if is_oom(e) else type(e).__name__
            fails.append({"shape": layer.name, "sparsity": str(sparsity), "task": task,
                          "error": f"{kind}: {str(e)[:300]}"})
            if not is_oom(e):
                traceback.print_exc()
        finally:
            step(f"{layer.name} {sparsity} {task}")
        gc.collect()  # after the except block: the traceback's frames no longer hold the tensors
        _free(dev)
        return None

    rows = {}
    for method, K in (("sparsegpt", 1), ("sparse-expansion", cfg.clusters)):
        for impl, fn in (("library", prune_library), ("reference", prune_reference)):
            if impl == "reference" and not cfg.reference:
                continue

            def measured(fn=fn, K=K, method=method, impl=impl):
                run = _measure(lambda: fn(W, layer.calib, sparsity, K, cfg), cfg)
                # short pipelines are at the mercy of a busy machine: repeat them and keep the
                # fastest run (its stages all come from that run; the memory from the first)
                for _ in range(cfg.repeats - 1):
                    if run.total_s >= cfg.repeat_below_s:
                        break
                    again = fn(W, layer.calib, sparsity, K, cfg)
                    if again.total_s < run.total_s:
                        again.peak_extra_mb, again.peak_total_mb = run.peak_extra_mb, run.peak_total_mb
                        run = again
                if K == 1:
                    err = heldout_error(W, layer.heldout, lambda xb: F.linear(xb, run.W_hat[0]))
                else:  # tokens routed by the router to their expert
                    err = heldout_error(W, layer.heldout, SparseExpertLinear(run.router, run.W_hat))
                if run.H_c is not None:
                    run.calib_error = calibration_error(W, run)
                    run.H_c = None
                row = _prune_row(layer, sparsity, method, impl, run, err)
                if (method, impl) != ("sparse-expansion", "library"):  # only its experts are used later
                    run.W_hat = None
                return run, row

            got = attempt(f"{method} {impl}", measured)
            if got is not None:
                runs[(method, impl)], rows[(method, impl)] = got
                results["pruning"].append(rows[(method, impl)])
        if (method, "library") in rows and (method, "reference") in rows:
            results["pruning"].append(speedup_row(rows[(method, "library")], rows[(method, "reference")]))

    # quality of every method on the held-out tokens (magnitude and Wanda need no timing stages)
    sg = runs.get(("sparsegpt", "library"))
    se = runs.get(("sparse-expansion", "library"))
    base = {"shape": layer.name, "d_in": W.shape[1], "d_out": W.shape[0], "sparsity": str(sparsity),
            "heldout_tokens": layer.heldout.shape[0]}

    def quality():
        out = []
        t = time.perf_counter()
        W_mag = solvers.magnitude(W[None], sparsity)[0]
        out.append({**base, "method": "magnitude", "seconds": time.perf_counter() - t,
                    "heldout_error": heldout_error(W, layer.heldout, lambda xb: F.linear(xb, W_mag))})
        if sg is not None:
            t = time.perf_counter()
            W_w = solvers.wanda(W[None], sg.H_full, sparsity)[0]
            out.append({**base, "method": "wanda", "seconds": time.perf_counter() - t,
                        "heldout_error": heldout_error(W, layer.heldout, lambda xb: F.linear(xb, W_w))})
        for (method, impl), run in runs.items():
            row = rows[(method, impl)]
            out.append({**base, "method": method if impl == "library" else f"{method} (reference)",
                        "seconds": run.total_s, "heldout_error": row["heldout_error"],
                        "calib_error": run.calib_error})
        return out

    results["quality"] += attempt("quality", quality) or []
    if se is not None:
        results["inference"] += attempt("inference", lambda: bench_inference(layer, se, sparsity, cfg)) or []
    else:
        step(f"{layer.name} {sparsity} inference (skipped)")
    runs.clear()
    _free(dev)


# ----------------------------------------------------------------------------- targets

def evaluate_targets(results: dict, cfg: BenchConfig) -> list[dict]:
    rows = []
    by = {(r["shape"], r["sparsity"], r["method"], r["impl"]): r for r in results["pruning"]}
    for (shape, sp, method, impl), lib in by.items():
        if method != "sparse-expansion" or impl != "library":
            continue
        ref = by.get((shape, sp, method, "reference"))
        if ref is not None:
            speed = ref["total_s"] / lib["total_s"]
            same = lib["heldout_error"] <= ref["heldout_error"] * (1 + SAME_ERROR_TOL)
            rows.append({"target": f"SE {lib['clusters']} clusters >= 2x faster than one-cluster-at-a-time "
                                   f"reference at the same held-out error (<= {1 + SAME_ERROR_TOL:g}x)"
                                   + ("" if not cfg.gpu else " [CPU target, shown on GPU]"),
                         "shape": shape, "sparsity": sp, "value": speed,
                         "detail": f"error lib {lib['heldout_error']:.4g} vs ref {ref['heldout_error']:.4g}",
                         "pass": bool(speed >= 2.0 and same)})
        if cfg.gpu and cfg.scale == 1 and shape.startswith("7b"):
            rows.append({"target": "GPU 7B: one FFN linear into 16 experts < 10 s end to end",
                         "shape": shape, "sparsity": sp, "value": lib["total_s"], "detail": "seconds",
                         "pass": bool(lib["total_s"] < 10.0 and lib["clusters"] == 16)})
    for r in results["inference"]:
        if r["tokens"] != 4096:
            continue
        for key, what in (("routed_ratio", "routed forward (dense-masked experts)"),
                          ("routed24_ratio", "routed forward (2:4 compressed)")):
            if r.get(key) is not None:
                rows.append({"target": f"{what} <= 1.2x dense nn.Linear at 4096 tokens", "shape": r["shape"],
                             "sparsity": r["sparsity"], "value": r[key], "detail": "time ratio",
                             "pass": bool(r[key] <= 1.2)})
    return rows


# ----------------------------------------------------------------------------- output

def _fmt(v, nd=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "PASS" if v else "FAIL"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{nd}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _table(rows: list[dict], cols: list[tuple[str, str, int]]) -> str:
    lines = ["  ".join(f"{title:<{w}}" for _, title, w in cols).rstrip()]
    for r in rows:
        cells = []
        for key, _, w in cols:
            v = r.get(key)
            text = f"{v:.4g}" if "error" in key and isinstance(v, float) else _fmt(v)
            cells.append(f"{text:<{w}}")
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_report(results: dict) -> str:
    out = []
    out.append("## pruning cost: seconds per stage, peak memory above the pipeline's start (MiB), relative "
               "error on held-out and calibration tokens\n## speedup rows: reference / library for times and "
               "memory (< 1: the library is slower / uses more), reference / library for the error")
    out.append(_table(results["pruning"], [
        ("shape", "shape", 16), ("sparsity", "sparsity", 8), ("method", "method", 16), ("impl", "impl", 9),
        ("clusters", "K", 3), ("pca_s", "pca", 7), ("kmeans_s", "kmeans", 7), ("hessian_s", "hessian", 7),
        ("inverse_s", "inverse", 7), ("obs_s", "obs", 7), ("total_s", "total", 7),
        ("peak_extra_mb", "peak_MB", 8), ("heldout_error", "heldout_err", 11), ("calib_error", "calib_err", 9)]))
    out.append("\n## reconstruction error on held-out tokens (relative ||WX - W'X||^2 / ||WX||^2)")
    out.append(_table(results["quality"], [
        ("shape", "shape", 16), ("sparsity", "sparsity", 8), ("method", "method", 30),
        ("heldout_error", "heldout_err", 11), ("calib_error", "calib_err", 9), ("seconds", "seconds", 8)]))
    out.append("\n## routed inference (ms; routed includes routing) vs dense nn.Linear")
    out.append(_table(results["inference"], [
        ("shape", "shape", 16), ("sparsity", "sparsity", 8), ("tokens", "tokens", 6),
        ("active_experts", "active", 6), ("dense_ms", "dense", 8), ("routing_ms", "routing", 8),
        ("routed_ms", "routed", 8), ("routed_ratio", "routed/dense", 12), ("routed24_ms", "routed24", 8),
        ("routed24_ratio", "r24/dense", 9)]))
    out.append("\n## targets (pass/fail, not asserted)")
    out.append(_table(results["targets"], [
        ("target", "target", 96), ("shape", "shape", 16), ("sparsity", "sparsity", 8), ("value", "value", 8),
        ("pass", "pass", 5), ("detail", "detail", 0)]))
    for f in results["failures"]:
        out.append(f"# FAILED {f['shape']} {f['sparsity']} {f['task']}: {f['error']}")
    return "\n".join(out)


def device_tag(cfg: BenchConfig) -> str:
    if not cfg.gpu:
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(cfg.device)).strip("_").lower()


def write_csv(results: dict, path: str) -> None:
    """Long format: one measurement per line (section, shape, sparsity, method, impl, tokens, metric, value)."""
    keys = ("shape", "d_in", "d_out", "sparsity", "method", "impl", "clusters", "tokens")
    skip = set(keys) | {"cluster_sizes", "kmeans_backend", "target", "detail"}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", *keys, "metric", "value"])
        for section in ("pruning", "quality", "inference"):
            for r in results[section]:
                for k, v in r.items():
                    if k in skip or isinstance(v, (list, dict)):
                        continue
                    w.writerow([section, *(r.get(c, "") for c in keys), k, "" if v is None else v])
        for r in results["targets"]:
            w.writerow(["targets", r["shape"], "", "", r["sparsity"], r["target"], "", "", "", "pass", r["pass"]])
            w.writerow(["targets", r["shape"], "", "", r["sparsity"], r["target"], "", "", "", "value", r["value"]])


def write_plots(results: dict, prefix: str) -> list[str]:
    """Stacked bars of seconds per stage; routed and dense time against token count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grid(n, height):
        cols = min(4, n)
        rows_ = math.ceil(n / cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(3.4 * cols + 0.6, height * rows_), squeeze=False)
        flat = list(axes.flat)
        for ax in flat[n:]:
            ax.axis("off")
        return fig, flat[:n]

    written = []

    def save(fig, path: str) -> None:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    rows = [r for r in results["pruning"] if r["impl"] in ("library", "reference")]
    if rows:
        groups = list(dict.fromkeys((r["shape"], r["sparsity"]) for r in rows))
        fig, axes = grid(len(groups), 3.4)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, (shape, sp) in zip(axes, groups):
            sub = [r for r in rows if r["shape"] == shape and r["sparsity"] == sp]
            labels = [f"{'SGPT' if r['method'] == 'sparsegpt' else 'SE'}\n{r['impl'][:3]}" for r in sub]
            bottom = [0.0] * len(sub)
            for i, s in enumerate(STAGES):
                vals = [r[f"{s}_s"] for r in sub]
                ax.bar(labels, vals, bottom=bottom, label=s, color=colors[i % len(colors)])
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_title(f"{shape} {sp}", fontsize=9)
            ax.set_ylabel("seconds", fontsize=8)
            ax.tick_params(labelsize=8)
        axes[0].legend(fontsize=7)
        fig.suptitle("pruning time per stage (lib = library, ref = one cluster at a time)", fontsize=10)
        save(fig, f"{prefix}_stages.png")
    inf = results["inference"]
    if inf:
        groups = list(dict.fromkeys((r["shape"], r["sparsity"]) for r in inf))
        fig, axes = grid(len(groups), 3.2)
        for ax, (shape, sp) in zip(axes, groups):
            sub = [r for r in inf if r["shape"] == shape and r["sparsity"] == sp]
            T = [r["tokens"] for r in sub]
            ax.loglog(T, [r["dense_ms"] for r in sub], "o-", label="dense nn.Linear")
            ax.loglog(T, [r["routed_ms"] for r in sub], "s-", label="routed (incl. routing)")
            ax.loglog(T, [r["routing_ms"] for r in sub], ":", label="routing only")
            if any(r["routed24_ms"] is not None for r in sub):
                ax.loglog(T, [r["routed24_ms"] for r in sub], "^-", label="routed 2:4")
            ax.set_title(f"{shape} {sp}", fontsize=9)
            ax.set_xlabel("tokens", fontsize=8)
            ax.set_ylabel("ms", fontsize=8)
            ax.tick_params(labelsize=8)
        handles = {}
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        axes[0].legend(handles.values(), handles.keys(), fontsize=7)
        fig.suptitle("routed forward (SparseExpertLinear, routing included) vs dense nn.Linear", fontsize=10)
        save(fig, f"{prefix}_routed.png")
    return written


# ----------------------------------------------------------------------------- driver

def run(cfg: BenchConfig) -> dict:
    """Run the whole benchmark; returns the results dict (also written under cfg.out)."""
    if cfg.gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if cfg.small_clusters not in ("shrink", "damping"):
        raise SystemExit(f"--small-clusters {cfg.small_clusters!r}: the benchmark supports shrink or damping")
    sparsities = [Sparsity.parse(s) for s in cfg.sparsities]
    name = torch.cuda.get_device_name(cfg.device) if cfg.gpu else platform.processor() or "cpu"
    results = {"config": {**asdict(cfg), "device_name": name, "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "python": platform.python_version(),
                          "kernel_mode": os.environ.get("SPARSE_EXPANSION_KERNELS", "auto"),
                          "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")},
               "pruning": [], "quality": [], "inference": [], "targets": [], "failures": [],
               "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    paths = {}
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        tag = device_tag(cfg)
        paths = {"json": os.path.join(cfg.out, f"layerwise_{tag}.json"),
                 "csv": os.path.join(cfg.out, f"layerwise_{tag}.csv"),
                 "plots": os.path.join(cfg.out, f"layerwise_{tag}")}

    def save():
        results["targets"] = evaluate_targets(results, cfg)
        if paths:
            with open(paths["json"], "w") as f:
                json.dump(results, f, indent=1, default=str)
            write_csv(results, paths["csv"])

    names = ["smollm2 gate", "smollm2 down"] if cfg.inputs == "smollm2" else list(cfg.shapes)
    per_layer = 2 * (2 if cfg.reference else 1) + 2  # pruning runs, quality, inference
    bar = tqdm(total=1 + len(names) * len(sparsities) * per_layer, desc="layerwise", unit="task",
               disable=not cfg.progress, file=sys.stderr)

    def step(what):
        bar.set_postfix_str(what, refresh=False)
        bar.update()

    t_start = time.perf_counter()
    if cfg.inputs == "smollm2":
        layers = smollm2_layers(cfg)
    elif cfg.inputs == "synthetic":
        layers = None
    else:
        raise SystemExit(f"--inputs {cfg.inputs!r}: use synthetic or smollm2")
    step("inputs")
    for i, name_ in enumerate(names):
        try:
            layer = layers[i] if layers is not None else synthetic_layer(cfg, name_, i)
        except Exception as e:
            results["failures"].append({"shape": name_, "sparsity": "", "task": "inputs",
                                        "error": f"{'OOM' if is_oom(e) else type(e).__name__}: {str(e)[:300]}"})
            bar.update(len(sparsities) * per_layer)
            _free(cfg.device)
            continue
        for sp in sparsities:
            n_done = bar.n
            try:
                bench_layer(layer, sp, cfg, results, step)
            except Exception as e:  # e.g. an N:M pattern that does not divide the layer's inputs
                results["failures"].append({"shape": layer.name, "sparsity": str(sp), "task": "layer",
                                            "error": f"{type(e).__name__}: {str(e)[:300]}"})
                bar.update(per_layer - (bar.n - n_done))
            save()
        del layer
        if layers is not None:
            layers[i] = None
        _free(cfg.device)
    bar.close()
    results["seconds"] = time.perf_counter() - t_start
    save()
    results["paths"] = dict(paths)
    if paths and cfg.plots:
        try:
            results["paths"]["png"] = write_plots(results, paths["plots"])
        except ImportError:
            results["paths"]["png"] = []
            print("# matplotlib is not installed: no plots (pip install matplotlib)")
    return results


def config_from_args(argv=None) -> BenchConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help=f"shapes / 16, {QUICK['nsamples']}x{QUICK['seqlen']} calibration tokens (CPU minutes)")
    mode.add_argument("--full", action="store_true",
                      help=f"real Llama-2 shapes, {FULL['nsamples']}x{FULL['seqlen']} calibration tokens (GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--scale", type=int, help="divide the Llama shapes by this (quick: 16, full: 1)")
    ap.add_argument("--inputs", default="synthetic", choices=("synthetic", "smollm2"))
    ap.add_argument("--layer", type=int, default=14, help="SmolLM2 decoder block (--inputs smollm2)")
    ap.add_argument("--nsamples", type=int)
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--heldout", type=int, help="held-out tokens")
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--pca-factor", type=int, default=32)
    ap.add_argument("--restarts", type=int, default=10, help="k-means restarts")
    ap.add_argument("--kmeans-backend", default="auto")
    ap.add_argument("--small-clusters", default="shrink", choices=("shrink", "damping"))
    ap.add_argument("--sparsity", help="comma list (default 0.5,2:4): unstructured rates and N:M patterns")
    ap.add_argument("--dtype", help="activations / inference weights (default fp16 on CUDA, fp32 on CPU)")
    ap.add_argument("--no-reference", action="store_true", help="skip the one-cluster-at-a-time reference")
    ap.add_argument("--reference-pca", choices=("svd", "eigh"),
                    help="reference PCA: textbook SVD (default on CPU) or the covariance eigh (default on "
                         "CUDA, where the SVD of the full calibration set takes minutes)")
    ap.add_argument("--tokens", default=",".join(map(str, TOKEN_COUNTS)), help="inference token counts")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU torch threads (default 1: on a busy small machine OpenMP barriers make "
                         "small multi-threaded ops far slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    gpu = torch.device(a.device).type == "cuda"
    preset = FULL if a.full else QUICK if a.quick else (FULL if gpu else QUICK)
    cfg = BenchConfig(device=a.device, shapes=tuple(s for s in a.shapes.split(",") if s),
                      inputs=a.inputs, layer=a.layer, clusters=a.clusters, pca_factor=a.pca_factor,
                      kmeans_restarts=a.restarts, kmeans_backend=a.kmeans_backend,
                      small_clusters=a.small_clusters,
                      dtype=a.dtype or ("float16" if gpu else "float32"), reference=not a.no_reference,
                      reference_pca=a.reference_pca or ("eigh" if gpu else "svd"),
                      token_counts=tuple(int(t) for t in a.tokens.split(",")), seed=a.seed,
                      progress=not a.no_progress, plots=not a.no_plots, out=a.out, **preset)
    for key, val in (("scale", a.scale), ("nsamples", a.nsamples), ("seqlen", a.seqlen),
                     ("heldout_tokens", a.heldout), ("sparsities", a.sparsity and tuple(a.sparsity.split(",")))):
        if val is not None:
            cfg = replace(cfg, **{key: val})
    unknown = [s for s in cfg.shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}")
    if not gpu:
        torch.set_num_threads(a.threads)
    return cfg


def main(argv=None) -> int:
    cfg = config_from_args(argv)
    what = (f"SmolLM2 block {cfg.layer} gate_proj/down_proj inputs" if cfg.inputs == "smollm2"
            else f"synthetic inputs, Llama-2 shapes / {cfg.scale}")
    print(f"# layerwise benchmark on {cfg.device} ({torch.cuda.get_device_name(cfg.device) if cfg.gpu else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {what}; {cfg.nsamples}x{cfg.seqlen} "
          f"calibration tokens, {cfg.heldout_tokens} held out; {cfg.clusters} clusters, k-means restarts "
          f"{cfg.kmeans_restarts}, small clusters: {cfg.small_clusters}; sparsity {','.join(cfg.sparsities)}; "
          f"dtype {cfg.dtype}", flush=True)
    if not cfg.gpu:
        print("# CPU: library and reference both run the torch code paths (no Triton); the library's gain "
              "is batching the clusters, not a faster kernel", flush=True)
    results = run(cfg)
    print(format_report(results))
    print(f"# {results['seconds']:.0f} s; wrote " + ", ".join(
        [results["paths"].get("json", ""), results["paths"].get("csv", "")] + results["paths"].get("png", [])))
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
