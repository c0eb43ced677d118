"""The library pipeline: the driver's stage functions called in order with a timer around each.

Sparse Expansion (methods/expansion/stages.py, as method.py's ClusterStats and
ExpansionMethod.prune_group call them):
  hessian  the layer's Hessian and mean input (kernels.hessian.accumulate_hessian batch by batch)
  router   fit_group_router (PCA from that Hessian and mean + k-means on the calibration tokens,
           at most max_cluster_tokens of them, token_sample), and the cluster of every token
  hessian  accumulate_hessian with labels batch by batch, solve_hessians (the small-cluster rule)
  inverse  solvers.inverse_hessian_factor, all clusters at once
  obs      solve_experts (batched SparseGPT over all clusters' copies of W), then the re-solve on
           each expert's mask (solvers.refine_on_mask, refine_steps of the options)
SparseGPT: methods.HessianStats batch by batch (hessian), then the same inverse and obs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sparse_expansion.methods.expansion import stages
from sparse_expansion import solvers
from sparse_expansion.kernels.hessian import accumulate_hessian, complete_hessian
from sparse_expansion.methods import HessianStats
from sparse_expansion.methods.expansion.router import Router
from sparse_expansion.sparsity import Sparsity

from .config import BenchConfig
from .measure import StageClock, sync

METHODS = ("sparsegpt", "sparse-expansion")


@dataclass
class PruneRun:
    W_hat: torch.Tensor | None            # [K, d_out, d_in] fp32
    router: Router | None
    seconds: dict
    total_s: float
    peak_extra_mb: float | None = None
    peak_total_mb: float | None = None
    H_full: torch.Tensor | None = None    # [1, C, C] the layer's Hessian (library runs; Wanda uses it)
    H_c: torch.Tensor | None = None       # [K, C, C] cluster Hessians, for the in-sample error
    counts: torch.Tensor | None = None    # [K] calibration tokens per cluster (library runs)
    cluster_sizes: list[int] = field(default_factory=list)
    damping: list[float] = field(default_factory=list)
    calib_error: float | None = None
    kmeans_backend: str | None = None


def route_tokens(batches: list[torch.Tensor], cfg: BenchConfig, H_full: torch.Tensor):
    """(RouterFit, fp32 batches, labels per batch) as ClusterStats gets them: the router fit on a
    seeded sample of at most max_cluster_tokens rows, its PCA from the layer's Hessian H_full and
    the mean row; when the sample holds every row, the Hessians are accumulated from its fp32 rows
    and the fit's labels, otherwise from the batches as given."""
    o = cfg.expansion
    sizes = [xb.shape[0] for xb in batches]
    x = torch.cat(batches).float()
    keep = stages.token_sample(x.shape[0], o.max_cluster_tokens, cfg.seed)
    sample = x if keep is None else x[keep.to(x.device)]
    row_sum = torch.zeros(1, x.shape[1], dtype=torch.float64, device=x.device)
    for xb in batches:
        stages.add_cluster_sums(row_sum, xb)
    fit, _ = stages.fit_group_router(sample, o.clusters, o.pca_factor, cfg.seed, o.kmeans_restarts,
                                     o.kmeans_backend, o.small_clusters, o.min_cluster_tokens, x.shape[0],
                                     H_full, row_sum[0] / x.shape[0])
    if keep is None:
        return fit, list(x.split(sizes)), list(fit.labels.split(sizes))
    del x, sample
    return fit, batches, [fit.router.assign(xb) for xb in batches]


def cluster_hessians(batches: list[torch.Tensor], labels: list[torch.Tensor], clusters: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_c [K, C, C], counts [K]): accumulate_hessian with labels (None: one cluster), batch by batch."""
    C = batches[0].shape[1]
    H_c = torch.zeros(clusters, C, C, dtype=torch.float32, device=batches[0].device)
    counts = torch.zeros(clusters, dtype=torch.long, device=batches[0].device)
    for xb, lb in zip(batches, labels):
        accumulate_hessian(H_c, counts, xb, lb)
    return complete_hessian(H_c), counts


def prune_library(W: torch.Tensor, batches: list[torch.Tensor], sparsity: Sparsity, cfg: BenchConfig,
                  method: str) -> PruneRun:
    """The driver's computation for one linear, stage by stage: SparseGPTMethod ("sparsegpt") or
    ExpansionMethod ("sparse-expansion"), with the settings of cfg.expansion."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: use one of {METHODS}")
    o, dev = cfg.expansion, cfg.device
    clock = StageClock(dev)
    t0 = time.perf_counter()
    fit = None
    if method == "sparsegpt":
        with clock("hessian"):
            stats = HessianStats(W.shape[1], dev)
            for xb in batches:
                stats.add_batch(xb)
        H_c = H_full = H_solve = stats.H
        counts = stats.count
    else:
        with clock("hessian"):
            H_full, _ = cluster_hessians(batches, [None] * len(batches), 1)
        with clock("router"):
            fit, batches, labels = route_tokens(batches, cfg, H_full)
        with clock("hessian"):
            H_c, counts = cluster_hessians(batches, labels, fit.router.clusters)
            means = within = None
            if o.small_clusters == "pooled":
                sums = torch.zeros(fit.router.clusters, W.shape[1], dtype=torch.float64, device=dev)
                for xb, lb in zip(batches, labels):
                    stages.add_cluster_sums(sums, xb, lb)
                means = stages.cluster_means(sums, counts)
                within = stages.within_cluster_hessian(H_full, means, counts)
            H_solve = stages.solve_hessians(H_c, counts, H_full, o.small_clusters, o.shrink_tokens, means=means,
                                            within=within)
        del batches, labels
    clusters = 1 if fit is None else fit.router.clusters
    damping = stages.expert_damping(o.small_clusters, o.expert_damping, o.percdamp, clusters, W.shape[1],
                                     int(torch.as_tensor(counts).sum()))
    with clock("inverse"):
        factor = solvers.inverse_hessian_factor(H_solve, damping, method)
    steps = o.refine_steps(None) if method == "sparse-expansion" else 0  # SparseGPTMethod's default: 0
    with clock("obs"):
        W_hat, info = stages.solve_experts(W, factor, sparsity, None, o.blocksize)
        solvers.refine_on_mask(W[None], W_hat, H_solve, info.damping, steps)
    del factor, H_solve
    sync(dev)
    return PruneRun(W_hat, None if fit is None else fit.router, clock.seconds, time.perf_counter() - t0,
                    H_full=H_full, H_c=H_c, counts=counts, cluster_sizes=counts.tolist(), damping=info.damping,
                    kmeans_backend=None if fit is None else fit.backend)


def calibration_error(W: torch.Tensor, run: PruneRun) -> float:
    """In-sample error as the driver reports it (expansion.expert_errors): Σ_c n_c·tr(ΔW_c H_c ΔW_cᵀ)
    / (N·tr(W H Wᵀ))."""
    return stages.expert_errors(W, run.W_hat, run.H_c, run.counts, run.H_full)[0]
