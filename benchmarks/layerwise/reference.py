"""The independent baseline: Sparse Expansion one cluster at a time, as SparseGPT's own code
prunes a single matrix. Deliberately hand-written, not the library's stages:
  router   PCA (textbook SVD of the centred tokens; or the covariance eigh, --reference-pca) and
           Lloyd's k-means with a Python loop over clusters for the centroid update
  hessian  per cluster, SparseGPT's add_batch running average over the same batches (the small-
           cluster rule: pooled, toward the cluster's mean outer product plus the pooled within-
           cluster scatter (computed from the centred tokens in fp64); shrink, toward the layer's
           Hessian; or none for damping; an empty cluster takes the layer's Hessian)
  inverse  per cluster, solvers.inverse_hessian_factor on that single matrix (the rule's damping:
           the library's `expert_damping` policy)
  obs      per cluster, the torch reference kernels.obs.obs_prune_reference
It fits on every calibration token (no max_cluster_tokens sample) and knows no `merge` rule.
"""
from __future__ import annotations

import math
import time

import torch

from sparse_expansion.methods.expansion import stages
from sparse_expansion import solvers
from sparse_expansion.kernels.obs import obs_prune_reference
from sparse_expansion.methods.expansion.router import Router
from sparse_expansion.sparsity import Sparsity

from .config import BenchConfig
from .measure import StageClock, sync
from .stages import PruneRun


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


def pooled_within(batches: list[torch.Tensor], labels: list[torch.Tensor], clusters: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(2/N·Σ_c Σ_(x in c) (x − μ_c)(x − μ_c)ᵀ [C, C], means μ_c [K, C]), textbook style in fp64:
    the pooled rule shrinks cluster c toward the first plus 2·μ_cμ_cᵀ."""
    x, lab = torch.cat(batches).double(), torch.cat(labels)
    means = torch.zeros(clusters, x.shape[1], dtype=torch.float64, device=x.device)
    scatter = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for k in lab.unique().tolist():
        means[k] = x[lab == k].mean(0)
        d = x[lab == k] - means[k]
        scatter += d.t() @ d
    return (2 * scatter / x.shape[0]).float(), means.float()


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


def prune_reference(W: torch.Tensor, batches: list[torch.Tensor], sparsity: Sparsity, cfg: BenchConfig,
                    method: str) -> PruneRun:
    """SparseGPT ("sparsegpt", one cluster) or Sparse Expansion one cluster at a time."""
    o, dev = cfg.expansion, cfg.device
    clusters = 1 if method == "sparsegpt" else o.clusters
    clock = StageClock(dev)
    t0 = time.perf_counter()
    C = W.shape[1]
    router, labels = None, None
    with clock("hessian"):
        H_full, n_total = reference_hessian(batches, None, 0)
    if clusters > 1:
        with clock("router"):
            x = torch.cat(batches).float()
            mean, basis = (reference_pca(x, max(1, C // o.pca_factor), cfg.reference_pca) if o.pca_factor
                           else (None, None))
            z = x if basis is None else (x - mean) @ basis
            centroids = reference_kmeans(z, clusters, cfg.seed, o.kmeans_restarts)
            flat = torch.cdist(z, centroids).argmin(1)
            labels = list(flat.split([b.shape[0] for b in batches]))
            router = Router(centroids, mean, basis).to(dev)
            del x, z
    W_hat = torch.empty(clusters, *W.shape, dtype=torch.float32, device=dev)
    sizes, dampings = [], []
    tau = stages.shrink_tau(o.shrink_tokens, C, o.small_clusters)
    damping = stages.expert_damping(o.small_clusters, o.expert_damping, o.percdamp, clusters, C, n_total)
    if clusters > 1 and o.small_clusters == "pooled":
        with clock("hessian"):
            within, means = pooled_within(batches, labels, clusters)
    for c in range(clusters):
        with clock("hessian"):
            if clusters == 1:
                H, n = H_full, n_total
            else:
                H, n = reference_hessian(batches, labels, c)
                if n == 0:
                    H = H_full
                elif o.small_clusters in ("shrink", "pooled") and n < n_total:
                    target = H_full if o.small_clusters == "shrink" else within + 2 * torch.outer(means[c], means[c])
                    H = (n * H + tau * target) / (n + tau)
        with clock("inverse"):
            f = solvers.inverse_hessian_factor(H[None], damping)
        with clock("obs"):
            Wc = W.float().clone()[None]
            Wc[f.dead[:, None, :].expand_as(Wc)] = 0.0
            Wc, _ = obs_prune_reference(Wc, f.Hinv, sparsity.rate if not sparsity.structured else 0.0,
                                        sparsity.n, sparsity.m, None, o.blocksize)
            W_hat[c] = Wc[0]
        sizes.append(n)
        dampings += f.damping
        del H, f, Wc
    sync(dev)
    return PruneRun(W_hat, router, clock.seconds, time.perf_counter() - t0, cluster_sizes=sizes,
                    damping=dampings, kmeans_backend="reference" if clusters > 1 else None)
