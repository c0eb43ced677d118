"""Sparse Expansion (Sawmya et al., ICLR 2025): one SparseGPT expert per input cluster.

For each group of linears sharing an input (gate_proj + up_proj of a Llama MLP; every other FFN
linear alone): fit a router (PCA + k-means) on the group's calibration inputs, accumulate one
Hessian per cluster, prune one copy of each linear per cluster with SparseGPT (all clusters in
one batched solve), and swap in `SparseExpertLinear` modules that share the group's router.

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


class InputStore:
    """Keeps a group's calibration inputs batch by batch (fp32)."""

    def __init__(self):
        self.batches: list[torch.Tensor] = []

    def add_batch(self, x: torch.Tensor) -> None:
        self.batches.append(x.reshape(-1, x.shape[-1]).float())

    def tokens(self) -> torch.Tensor:
        return torch.cat(self.batches)


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


class ExpansionMethod:
    """The `sparse-expansion` method for the sequential driver (see driver.Method)."""

    def __init__(self, config):
        if config.clusters < 1:
            raise UsageError(f"--clusters {config.clusters}: must be at least 1")
        if config.pca_factor < 0:
            raise UsageError(f"--pca-factor {config.pca_factor}: use 0 (no PCA) or a positive divisor")
        if config.small_clusters not in SMALL_CLUSTER_RULES:
            raise UsageError(f"--small-clusters {config.small_clusters!r}: use one of {', '.join(SMALL_CLUSTER_RULES)}")
        self.config = config

    def collector(self, layers: dict[str, nn.Module]) -> InputStore:
        return InputStore()

    @staticmethod
    def _cluster_hessians(store: InputStore, labels: torch.Tensor, clusters: int):
        """Per-cluster H_c [K, d, d] and counts [K], and the layer's full H [1, d, d] = Σ n_c·H_c / N."""
        d, device = store.batches[0].shape[1], labels.device
        H = torch.zeros(clusters, d, d, dtype=torch.float32, device=device)
        counts = torch.zeros(clusters, dtype=torch.long, device=device)
        start = 0
        for xb in store.batches:  # same batches as SparseGPT's accumulation: K = 1 gives its H exactly
            accumulate_hessian(H, counts, xb, labels[start:start + xb.shape[0]])
            start += xb.shape[0]
        full = torch.einsum("k,kij->ij", counts.to(H.dtype), H)[None] / start
        return H, counts, full

    def prune_group(self, block: nn.Module, layers: dict[str, nn.Module], store: InputStore, where: str) -> list[dict]:
        cfg = self.config
        x = store.tokens()
        t0 = time.perf_counter()
        fit = fit_router(x, cfg.clusters, cfg.pca_factor, cfg.seed, cfg.kmeans_restarts, cfg.kmeans_backend)
        router, labels = fit.router, fit.labels
        t_router = time.perf_counter() - t0
        handling: dict = {"rule": cfg.small_clusters}
        if cfg.small_clusters == "merge":
            router, labels, dropped = merge_small_clusters(router, x, labels, cfg.min_cluster_tokens)
            handling["merged_clusters"] = dropped
        t1 = time.perf_counter()
        H_c, counts, H_full = self._cluster_hessians(store, labels, router.clusters)
        total = x.shape[0]
        H_solve = solve_hessians(H_c, counts, H_full, cfg.small_clusters, cfg.shrink_tokens)
        if cfg.small_clusters == "shrink":
            handling["shrink_tokens"] = cfg.shrink_tokens
        handling["empty_clusters_full_hessian"] = torch.nonzero(counts == 0).flatten().tolist()
        factor = solvers.inverse_hessian_factor(H_solve, cfg.percdamp, f"{where}.{'/'.join(layers)}")
        t_hessian = time.perf_counter() - t1
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
                "kmeans_backend": fit.backend, "kmeans_inertia": fit.inertia,
                "seconds_router": t_router, "seconds_hessian": t_hessian,
                "seconds_solve": time.perf_counter() - t2,
            })
        return reports
