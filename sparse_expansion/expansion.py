"""Sparse Expansion (Sawmya et al., ICLR 2025): one SparseGPT expert per input cluster.

For each group of linears sharing an input (gate_proj + up_proj of a Llama MLP; every other FFN
linear alone): fit a router (PCA + k-means) on the group's calibration inputs (a seeded sample of
at most `max_cluster_tokens` of them), accumulate one Hessian per cluster batch by batch, prune
one copy of each linear per cluster with SparseGPT (all clusters in one batched solve), and swap
in `SparseExpertLinear` modules that share the group's router.

Small clusters (the paper's code leaves clusters of 1-7 tokens in some layers) are handled by an
explicit rule, reported per layer:
  damping  the paper's behaviour: the cluster's own Hessian, SparseGPT's damping only;
  shrink   H_c' = (n_c·H_c + τ·H)/(n_c + τ), τ in tokens, H the layer's full Hessian;
  merge    clusters under `min_cluster_tokens` are dropped from the router and their tokens
           re-routed to the nearest remaining centroid.
A cluster that receives no calibration token at all is pruned with the layer's full Hessian.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from . import solvers
from .errors import UsageError
from .experts import SparseExpertLinear
from .kernels.hessian import accumulate_hessian
from .models import linear_weight
from .router import Router, fit_router, nearest_centroid

SMALL_CLUSTER_RULES = ("damping", "shrink", "merge")


def merge_small_clusters(router: Router, x: torch.Tensor, labels: torch.Tensor, min_tokens: int
                         ) -> tuple[Router, torch.Tensor, list[int]]:
    """Drop centroids with fewer than `min_tokens` tokens (keeping at least the largest) and
    re-route their tokens to the nearest remaining centroid. Returns (router, labels, dropped)."""
    counts = torch.bincount(labels, minlength=router.clusters)
    keep = counts >= min_tokens
    if not keep.any():
        keep[counts.argmax()] = True
    dropped = torch.nonzero(~keep).flatten().tolist()
    if not dropped:
        return router, labels, []
    merged = Router(router.centroids[keep], router.mean, router.basis)
    return merged, nearest_centroid(merged.project(x), merged.centroids), dropped


def solve_hessians(H_c: torch.Tensor, counts: torch.Tensor, H_full: torch.Tensor, rule: str, tau: float
                   ) -> torch.Tensor:
    """The Hessians the experts are pruned with: empty clusters take the layer's H; with the
    `shrink` rule every other partial cluster becomes (n_c·H_c + τ·H)/(n_c + τ), in place."""
    H_solve = H_c.clone()
    total = int(counts.sum())
    for c, n in enumerate(counts.tolist()):
        if n == 0:
            H_solve[c] = H_full[0]
        elif rule == "shrink" and n < total:
            H_solve[c].mul_(n / (n + tau)).add_(H_full[0], alpha=tau / (n + tau))
    return H_solve


def token_sample(tokens: int, bound: int, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded sample of `bound` of `tokens` rows; None when all rows fit."""
    if tokens <= bound:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(tokens, generator=gen)[:bound].sort().values


class ClusterStats:
    """What Sparse Expansion collects for one group, in up to two passes over its input batches.

    Pass 1 keeps a seeded sample of at most `max_cluster_tokens` input rows (all of them when the
    calibration set is smaller) and fits the router on it. Pass 2 accumulates one Hessian per
    cluster, batch by batch, with the router's labels; when the sample holds every row it replays
    the stored rows instead of asking the driver for another pass over the block.
    """

    def __init__(self, config, tokens: int):
        self.config = config
        self.tokens = tokens
        self.keep = token_sample(tokens, config.max_cluster_tokens, config.seed)
        self.sample: list[torch.Tensor] = []
        self.seen = 0
        self.fit = None
        self.router_tokens = 0  # rows the router was fitted on
        self.H = self.counts = None
        self.handling: dict = {"rule": config.small_clusters}
        self.seconds_router = self.seconds_hessian = 0.0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if self.fit is not None:
            self._accumulate(x, self.fit.router.assign(x))
            return
        rows = x
        if self.keep is not None:  # the sampled rows that fall in this batch
            lo, hi = torch.searchsorted(self.keep, torch.tensor([self.seen, self.seen + x.shape[0]])).tolist()
            rows = x[(self.keep[lo:hi] - self.seen).to(x.device)]
        self.sample.append(rows.float())
        self.seen += x.shape[0]

    def _accumulate(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        t0 = time.perf_counter()
        if self.H is None:
            k, d = self.fit.router.clusters, x.shape[-1]
            self.H = torch.zeros(k, d, d, dtype=torch.float32, device=x.device)
            self.counts = torch.zeros(k, dtype=torch.long, device=x.device)
        accumulate_hessian(self.H, self.counts, x, labels)
        self.seconds_hessian += time.perf_counter() - t0

    def next_pass(self) -> bool:
        if self.fit is not None:
            return False
        cfg = self.config
        t0 = time.perf_counter()
        sizes = [rows.shape[0] for rows in self.sample]
        x = torch.cat(self.sample)
        self.sample = None  # the batches live on as views of x
        fit = fit_router(x, cfg.clusters, cfg.pca_factor, cfg.seed, cfg.kmeans_restarts, cfg.kmeans_backend)
        if cfg.small_clusters == "merge":  # the threshold scaled to the sample
            min_tokens = cfg.min_cluster_tokens * x.shape[0] / self.tokens
            fit.router, fit.labels, self.handling["merged_clusters"] = merge_small_clusters(
                fit.router, x, fit.labels, min_tokens)
        self.fit, self.router_tokens = fit, x.shape[0]
        self.seconds_router = time.perf_counter() - t0
        if self.keep is not None:
            return True
        # same batches as SparseGPT's accumulation: one cluster gives its H exactly
        for xb, labels in zip(x.split(sizes), fit.labels.split(sizes)):
            self._accumulate(xb, labels)
        return False


class ExpansionMethod:
    """The `sparse-expansion` method for the sequential driver (see driver.Method)."""

    def __init__(self, config):
        if config.clusters < 1:
            raise UsageError(f"--clusters {config.clusters}: must be at least 1")
        if config.pca_factor < 0:
            raise UsageError(f"--pca-factor {config.pca_factor}: use 0 (no PCA) or a positive divisor")
        if config.small_clusters not in SMALL_CLUSTER_RULES:
            raise UsageError(f"--small-clusters {config.small_clusters!r}: use one of {', '.join(SMALL_CLUSTER_RULES)}")
        if config.max_cluster_tokens < config.clusters:
            raise UsageError(f"--max-cluster-tokens {config.max_cluster_tokens}: k-means needs at least as many "
                             f"tokens as --clusters ({config.clusters})")
        self.config = config

    def collector(self, layers: dict[str, nn.Module], tokens: int) -> ClusterStats:
        return ClusterStats(self.config, tokens)

    def prune_group(self, block: nn.Module, layers: dict[str, nn.Module], stats: ClusterStats, where: str
                    ) -> list[dict]:
        cfg, fit, H_c, counts = self.config, stats.fit, stats.H, stats.counts
        router, handling = fit.router, dict(stats.handling)
        t1 = time.perf_counter()
        total = int(counts.sum())
        H_full = torch.einsum("k,kij->ij", counts.to(H_c.dtype), H_c)[None] / total  # Σ n_c·H_c / N
        H_solve = solve_hessians(H_c, counts, H_full, cfg.small_clusters, cfg.shrink_tokens)
        if cfg.small_clusters == "shrink":
            handling["shrink_tokens"] = cfg.shrink_tokens
        handling["empty_clusters_full_hessian"] = torch.nonzero(counts == 0).flatten().tolist()
        factor = solvers.inverse_hessian_factor(H_solve, cfg.percdamp, f"{where}.{'/'.join(layers)}")
        t_hessian = stats.seconds_hessian + time.perf_counter() - t1
        t_router = stats.seconds_router
        sizes = counts.tolist()
        reports = []
        for name, module in layers.items():
            t2 = time.perf_counter()
            W = linear_weight(module).detach().float().clone(memory_format=torch.contiguous_format)
            experts = W.expand(router.clusters, *W.shape)
            W_hat, info = solvers.sparsegpt(experts, factor, cfg.sparsity, cfg.bits, cfg.blocksize)
            bias = None if module.bias is None else module.bias.detach().expand(router.clusters, -1).clone()
            block.set_submodule(name, SparseExpertLinear(router, W_hat.to(module.weight.dtype), bias))
            # error on each cluster's own tokens, and on all tokens as routed (‖ΔW_c X_c‖² = n_c/2·tr(ΔW_c H_c ΔW_cᵀ))
            num, den = solvers.error_terms(W[None], W_hat, H_c)
            full = ((W @ H_full[0]) * W).sum()
            per_cluster = (num / den.clamp(min=torch.finfo(torch.float32).tiny)).tolist()
            overall = float((counts.to(num.dtype) * num).sum() / (total * full))
            reports.append({
                "layer": f"{where}.{name}", "shape": list(W.shape), "tokens": total,
                "sparsity": float((W_hat == 0).float().mean()),
                "relative_error": overall,
                "clusters": router.clusters, "cluster_sizes": sizes,
                "cluster_relative_error": [e if s else None for e, s in zip(per_cluster, sizes)],
                "small_clusters": handling, "damping": info.damping, "dead_inputs": info.dead_inputs,
                "router_tokens": stats.router_tokens, "kmeans_backend": fit.backend, "kmeans_inertia": fit.inertia,
                "seconds_router": t_router, "seconds_hessian": t_hessian,
                "seconds_solve": time.perf_counter() - t2,
            })
        return reports
