"""Sparse Expansion's stages as plain tensor functions (Sawmya et al., ICLR 2025).

For one group of linears sharing an input: accumulate the layer's Hessian and mean input, fit a
router on the group's inputs (`fit_group_router`: PCA from those moments, k-means), accumulate
one Hessian per cluster (kernels.hessian with labels), derive the Hessians the experts are solved
with (`solve_hessians`: the small-cluster rule), factor them (solvers.inverse_hessian_factor),
then prune one copy of each linear per cluster in one batched SparseGPT call (`solve_experts`)
and measure it (`expert_errors`). method.py calls them from the driver; benchmarks/layerwise/
calls the same functions.

Small clusters (the paper's code leaves clusters of 1-7 tokens in some layers) are handled by an
explicit rule, reported per layer:
  pooled   (default) H_c' = (n_c·H_c + τ·T_c)/(n_c + τ) with T_c = B + 2·μ_cμ_cᵀ: the cluster's
           own mean μ_c kept exactly, its spread around the mean shrunk toward the layer's pooled
           within-cluster one (B = H − 2·Σ_c n_c/N·μ_cμ_cᵀ, `within_cluster_hessian`); τ in
           tokens (None: d/4, d the layer's input dimension); the experts factored with damping
           0.1·(1 + k·d/N) of the mean diagonal (`expert_damping`; N the layer's tokens)
           instead of SparseGPT's 0.01;
  damping  the paper's behaviour: the cluster's own Hessian, SparseGPT's damping only;
  shrink   H_c' = (n_c·H_c + τ·H)/(n_c + τ), τ in tokens (None: the layer's input dimension d,
           the cluster's own estimate weighted n_c/(n_c + d), by how far it is from full rank),
           H the layer's full Hessian;
  merge    clusters under `min_cluster_tokens` are dropped from the router and their tokens
           re-routed to the nearest remaining centroid.
A cluster that receives no calibration token at all is pruned with the layer's full Hessian.
"""
from __future__ import annotations

import torch

from ... import solvers
from .router import Router, RouterFit, fit_router, nearest_centroid, pca_components, pca_from_hessian, sums_by_label
from ...sparsity import Sparsity

SMALL_CLUSTER_RULES = ("pooled", "shrink", "damping", "merge")
POOLED_DAMPING = 0.1  # the pooled rule's damping of the experts' Hessians with plenty of tokens per cluster


def token_sample(tokens: int, bound: int, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded sample of `bound` of `tokens` rows; None when all rows fit."""
    if tokens <= bound:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(tokens, generator=gen)[:bound].sort().values


def merge_small_clusters(router: Router, x: torch.Tensor, labels: torch.Tensor, min_tokens: float
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


def fit_group_router(x: torch.Tensor, clusters: int, pca_factor: int, seed: int, restarts: int, backend: str,
                     rule: str, min_cluster_tokens: int, tokens: int, H_full: torch.Tensor,
                     mean: torch.Tensor) -> tuple[RouterFit, dict]:
    """The router of a group fit on x [N, d] (N of the group's `tokens` calibration rows), its PCA
    from the layer's Hessian H_full [1, d, d] and mean input [d] over all the rows, with the
    `merge` rule applied (its threshold scaled to the sample); and how small clusters are handled."""
    components = pca_components(x.shape[1], pca_factor)
    pca = pca_from_hessian(H_full[0], mean, components) if components else None
    fit = fit_router(x, clusters, pca_factor, seed, restarts, backend, pca)
    handling: dict = {"rule": rule}
    if rule == "merge":
        fit.router, fit.labels, handling["merged_clusters"] = merge_small_clusters(
            fit.router, x, fit.labels, min_cluster_tokens * x.shape[0] / tokens)
    return fit, handling


def shrink_tau(tau: float | None, columns: int, rule: str = "shrink") -> float:
    """τ in tokens of the shrink and pooled rules: as given, or (None) the rule's default: the
    layer's input dimension d (shrink), d/4 (pooled)."""
    if tau is not None:
        return float(tau)
    return columns / 4 if rule == "pooled" else float(columns)


def layer_hessians(rule: str) -> int:
    """[d, d] fp32 matrices a group keeps beside its cluster Hessians: the layer's H, and under
    the pooled rule its within-cluster B."""
    return 2 if rule == "pooled" else 1


def expert_damping(rule: str, damping: float | None, percdamp: float, clusters: int, columns: int,
                   tokens: int) -> float:
    """The damping the experts' Hessians are factored with: SparseGPT's `percdamp` for a single
    cluster (the layer's Hessian: exactly SparseGPT), else as given, or (None) the rule's default:
    for pooled POOLED_DAMPING·(1 + k·d/N), more the fewer tokens an average cluster of the layer's
    N holds for its d inputs (0.1 with plenty of tokens; SmolLM2 at the reference protocol: 0.16
    for gate/up_proj, 0.25 for down_proj), `percdamp` for the other rules."""
    if clusters == 1:
        return percdamp
    if damping is not None:
        return damping
    return POOLED_DAMPING * (1 + clusters * columns / max(tokens, 1)) if rule == "pooled" else percdamp


def add_cluster_sums(sums: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None = None,
                     rows: int = 4096) -> None:
    """Add the rows of x [N, d] to their clusters' sums [k, d] (fp64) in place, in fp32 within
    blocks of `rows` (the transient copy of a bf16 batch stays small); labels None: every row in
    cluster 0 (the sum of all rows, as pass 1 takes it for the mean input)."""
    if labels is None:
        labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for xb, lb in zip(x.split(rows), labels.split(rows)):
        sums += sums_by_label(xb.float(), lb, sums.shape[0]).double()  # no atomics: the same sums every run


def cluster_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean input [k, d] (fp64) of every cluster from its sum of rows; 0 for an empty cluster."""
    return sums.double() / counts.clamp(min=1).to(torch.float64)[:, None]


def within_cluster_hessian(H_full: torch.Tensor, means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The layer's pooled within-cluster Hessian B = H − 2·Σ_c n_c/N·μ_cμ_cᵀ [d, d] (fp32; the
    Hessians are 2/N·XᵀX), from all clusters' means [k, d] and counts."""
    w = ((counts.to(torch.float64) / counts.sum()).sqrt()[:, None] * means).to(H_full.device, torch.float32)
    return torch.addmm(H_full[0], w.T, w, alpha=-2.0)


def solve_hessians(H_c: torch.Tensor, counts: torch.Tensor, H_full: torch.Tensor, rule: str, tau: float | None,
                   total: int | None = None, means: torch.Tensor | None = None,
                   within: torch.Tensor | None = None) -> torch.Tensor:
    """The Hessians the experts are pruned with: empty clusters take the layer's H; with the
    `shrink` rule every other partial cluster becomes (n_c·H_c + τ·H)/(n_c + τ), with `pooled`
    (n_c·H_c + τ·T_c)/(n_c + τ), T_c = B + 2·μ_cμ_cᵀ (`means` of these clusters [k, d], `within`
    = B from `within_cluster_hessian`); τ from `shrink_tau`. H_c, counts and means may be a
    chunk of the clusters; `total` is then the layer's token count (default: Σ counts)."""
    tau = shrink_tau(tau, H_c.shape[-1], rule)
    if rule == "pooled" and (means is None or within is None):
        raise ValueError("the pooled rule needs the clusters' means and the within-cluster Hessian")
    H_solve = H_c.clone()
    total = int(counts.sum()) if total is None else total
    for c, n in enumerate(counts.tolist()):
        if n == 0:
            H_solve[c] = H_full[0]
        elif rule in ("shrink", "pooled") and n < total:
            H_solve[c].mul_(n / (n + tau)).add_(H_full[0] if rule == "shrink" else within, alpha=tau / (n + tau))
            if rule == "pooled":
                mu = means[c].to(H_c.device, torch.float32)
                H_solve[c].addr_(mu, mu, alpha=2 * tau / (n + tau))
    return H_solve


def cluster_cost(columns: int, rows: int) -> int:
    """Bytes one cluster adds to a chunk (fp32, measured on the CPU): while its Hessian is factored,
    the Hessian, its solve copy and the factorisation's workspace (5·C²); while a linear's expert
    is solved and compressed, the Hessian and the factor (2·C²) and the expert's copies (4·R·C).
    (The re-solve on the mask works on one expert at a time: `refine_cost`, once per chunk.)"""
    return 4 * max(5 * columns * columns, 2 * columns * columns + 4 * rows * columns)


def refine_cost(columns: int, rows: int) -> int:
    """Bytes the re-solve on the mask adds beside a chunk: one expert's solve Hessian and its
    transients (solvers.REFINE_BYTES_PER_WEIGHT)."""
    return 4 * columns * columns + solvers.REFINE_BYTES_PER_WEIGHT * min(rows, solvers.REFINE_ROWS) * columns


def cluster_chunks(clusters: int, columns: int, rows: int, budget: int | None) -> list[slice]:
    """Consecutive ranges of clusters whose Hessians and solve fit `budget` bytes (None: one
    range; at least one cluster per range: the caller refuses budgets below `cluster_cost`)."""
    if budget is None:
        return [slice(0, clusters)]
    size = max(1, min(clusters, budget // cluster_cost(columns, rows)))
    return [slice(start, min(start + size, clusters)) for start in range(0, clusters, size)]


def solve_experts(W: torch.Tensor, factor: solvers.HessianFactor, sparsity: Sparsity, bits: int | None,
                  blocksize: int) -> tuple[torch.Tensor, solvers.SolveInfo]:
    """One SparseGPT copy of W [R, C] per cluster of `factor` (K of them): [K, R, C] fp32."""
    W = W.detach().float().clone(memory_format=torch.contiguous_format)
    return solvers.sparsegpt(W.expand(factor.Hinv.shape[0], *W.shape), factor, sparsity, bits, blocksize)


def expert_errors(W: torch.Tensor, W_hat: torch.Tensor, H_c: torch.Tensor, counts: torch.Tensor,
                  H_full: torch.Tensor) -> tuple[float, list[float | None]]:
    """(error on all tokens as routed, error of each expert on its own cluster's tokens; None for
    an empty cluster), relative to ‖WX‖², using ‖ΔW_c X_c‖² = n_c/2·tr(ΔW_c H_c ΔW_cᵀ)."""
    return combine_errors(W, *solvers.error_terms(W.detach().float()[None], W_hat, H_c), counts, H_full)


def combine_errors(W: torch.Tensor, num: torch.Tensor, den: torch.Tensor, counts: torch.Tensor,
                   H_full: torch.Tensor) -> tuple[float, list[float | None]]:
    """`expert_errors` from the per-expert terms of solvers.error_terms (gathered chunk by chunk)."""
    W = W.detach().float()
    full = ((W @ H_full[0]) * W).sum()
    per_cluster = (num / den.clamp(min=torch.finfo(torch.float32).tiny)).tolist()
    overall = float((counts.to(num.dtype) * num).sum() / (int(counts.sum()) * full))
    return overall, [e if n else None for e, n in zip(per_cluster, counts.tolist())]
