"""The `sparse-expansion` method: one SparseGPT expert per input cluster, routed per token.

The stages are the functions of stages.py beside it; this module collects what they
need from the driver's passes (`ClusterStats`) and swaps in `SparseExpertLinear` modules that
share the group's router.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from . import stages
from ... import distributed, solvers
from ...errors import UsageError, option, setting
from .experts import SparseExpertLinear, compress, concat_compressed
from ...kernels.hessian import accumulate_hessian, complete_hessian
from ...memory import available_host_bytes, free_device_bytes
from ...models import linear_weight
from ...reports import LayerReport
from .router import KMEANS_BACKENDS, RouterFit
from ..sparsegpt import SparseGPTOptions
from ..base import Method

SOLVE_SHARE = 0.9  # the part of the free memory a chunked solve may take (solve_budget)


@dataclass
class ExpansionOptions(SparseGPTOptions):
    clusters: int = field(default=16, metadata={"help": "experts per layer (k-means clusters)"})
    pca_factor: int = field(default=32, metadata={"help": "PCA to input_dim // F components; 0 = no PCA"})
    kmeans_restarts: int = field(default=10, metadata={"help": "k-means restarts (best inertia kept)"})
    kmeans_backend: str = field(default="auto", metadata={"help": "auto, torch or cuml"})
    small_clusters: str = field(default="pooled", metadata={
        "help": "pooled (toward the cluster's mean + the layer's within-cluster spread), shrink (toward the "
                "layer Hessian), damping (paper) or merge"})
    shrink_tokens: float | None = field(default=None, metadata={
        "help": "tau of --small-clusters pooled/shrink, in tokens (default: d/4 for pooled, d for shrink; d the "
                "layer's input dimension)"})
    expert_damping: float | None = field(default=None, metadata={
        "help": "damping of the experts' Hessians, fraction of the mean diagonal (default: 0.1*(1 + k*d/N) for "
                "pooled, k clusters, d inputs, N tokens; else --percdamp)"})
    min_cluster_tokens: int = field(default=64, metadata={"help": "smallest cluster kept by --small-clusters merge"})
    refine_iterations: int | None = field(default=None, metadata={
        "help": "conjugate-gradient steps re-solving each expert's kept weights on its mask (default: 5, or 0 "
                "with --bits)"})
    max_cluster_tokens: int = field(default=262144, metadata={
        "help": "PCA and k-means fit on a seeded sample of at most this many tokens per layer"})

    def validate(self) -> None:
        super().validate()
        for name in ("clusters", "kmeans_restarts", "max_cluster_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"{setting(name, getattr(self, name))}: must be at least 1")
        if self.pca_factor < 0:
            raise UsageError(f"{setting('pca_factor', self.pca_factor)}: use 0 (no PCA) or a positive divisor")
        if self.kmeans_backend not in KMEANS_BACKENDS:
            raise UsageError(f"{setting('kmeans_backend', self.kmeans_backend)}: use one of "
                             f"{', '.join(KMEANS_BACKENDS)}")
        if self.small_clusters not in stages.SMALL_CLUSTER_RULES:
            raise UsageError(f"{setting('small_clusters', self.small_clusters)}: use one of "
                             f"{', '.join(stages.SMALL_CLUSTER_RULES)}")
        if self.expert_damping is not None and not 0 < self.expert_damping < 1:
            raise UsageError(f"{setting('expert_damping', self.expert_damping)}: use a fraction in (0, 1), e.g. 0.1")
        if (self.shrink_tokens or 0) < 0 or self.min_cluster_tokens < 0:
            raise UsageError(f"{option('shrink_tokens')} and {option('min_cluster_tokens')} must not be negative")
        if self.max_cluster_tokens < self.clusters:
            raise UsageError(f"{setting('max_cluster_tokens', self.max_cluster_tokens)}: k-means needs at least as "
                             f"many tokens as {option('clusters')} ({self.clusters})")


class ClusterStats:
    """What Sparse Expansion collects for one group, and its experts solved chunk by chunk.

    Pass 1 accumulates the layer's Hessian and the sum of the rows over every row, and keeps a
    seeded sample of at most `max_cluster_tokens` of them (all of them when the calibration set is
    smaller); at its end the router is fit (its PCA from the Hessian and mean) and this rank's
    clusters are split into chunks sized from the memory budget (`ExpansionMethod.chunks`). Then
    one pass per chunk: it accumulates the chunk's cluster Hessians (the first pass also every
    cluster's token count), and at its end the chunk's experts are
    solved, compressed and kept (`ExpansionMethod.solve_chunk`) and its Hessians freed. When the
    sample holds every row, the stored rows are replayed instead of asking the driver for passes.
    Only one chunk's Hessians exist at a time; the experts do not depend on the chunking.
    """

    def __init__(self, method: "ExpansionMethod", layers: dict[str, nn.Module], tokens: int, group: str):
        o = method.options
        self.method, self.layers, self.group, self.options = method, layers, group, o
        self.seed, self.tokens = method.config.seed, tokens
        self.keep = stages.token_sample(tokens, o.max_cluster_tokens, self.seed)
        # the router's rows, written batch by batch into one buffer (a list concatenated at the end
        # would hold the sample twice), and the rows each batch gave
        self.sample: torch.Tensor | None = None
        self.sizes: list[int] = []
        self.seen = 0
        self.fit = None
        self.router_tokens = 0  # rows the router was fitted on
        self.chunks: list[slice] = []
        self.current = 0  # index of the chunk being accumulated
        self.H_full = self.total = self.row_sum = None  # the layer's Hessian [1, C, C], its count, Σ rows (fp64)
        self.counts = None  # tokens per cluster
        self.sums = self.means = self.within = None  # pooled rule: per cluster, sum and mean of its rows; B
        self.H = self.chunk_counts = None  # the current chunk's cluster Hessians [k, C, C] and counts
        self.solved = {name: {"parts": [], "terms": [], "infos": [], "zeros": 0, "seconds": 0.0, "refine": 0.0}
                       for name in layers}
        self.handling: dict = {"rule": o.small_clusters}
        self.seconds_router = self.seconds_hessian = 0.0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if self.fit is not None:
            self._accumulate(x, self.fit.router.assign(x))
            return
        if self.H_full is None:
            d = x.shape[-1]
            self.H_full = torch.zeros(1, d, d, dtype=torch.float32, device=x.device)
            self.total = torch.zeros(1, dtype=torch.long, device=x.device)
            self.row_sum = torch.zeros(1, d, dtype=torch.float64, device=x.device)
        t0 = time.perf_counter()
        accumulate_hessian(self.H_full, self.total, x)
        stages.add_cluster_sums(self.row_sum, x)
        self.seconds_hessian += time.perf_counter() - t0
        rows = x
        if self.keep is not None:  # the sampled rows that fall in this batch
            lo, hi = torch.searchsorted(self.keep, torch.tensor([self.seen, self.seen + x.shape[0]])).tolist()
            rows = x[(self.keep[lo:hi] - self.seen).to(x.device)]
        if self.sample is None:  # in the model's dtype; the router fit computes in fp32
            rows_in_all = self.tokens if self.keep is None else len(self.keep)
            self.sample = torch.empty(rows_in_all, x.shape[-1], dtype=x.dtype, device=x.device)
        filled = sum(self.sizes)
        self.sample[filled:filled + rows.shape[0]] = rows
        self.sizes.append(rows.shape[0])
        self.seen += x.shape[0]

    def _accumulate(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        t0 = time.perf_counter()
        k, d, chunk = self.fit.router.clusters, x.shape[-1], self.chunks[self.current]
        if self.current == 0:  # the first chunk's passes also give the counts
            if self.counts is None:
                self.counts = torch.zeros(k, dtype=torch.long, device=x.device)
                if self.options.small_clusters == "pooled":
                    self.sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
            self.counts.scatter_add_(0, labels, torch.ones_like(labels))  # bincount would wait for a GPU
            if self.sums is not None:
                stages.add_cluster_sums(self.sums, x, labels)
        if self.H is None:
            self.H = torch.zeros(chunk.stop - chunk.start, d, d, dtype=torch.float32, device=x.device)
            self.chunk_counts = torch.zeros(chunk.stop - chunk.start, dtype=torch.long, device=x.device)
        if chunk.stop - chunk.start < k:  # the chunk's rows, in order: each cluster sees the same rows
            inside = (labels >= chunk.start) & (labels < chunk.stop)
            x, labels = x[inside], labels[inside] - chunk.start
        accumulate_hessian(self.H, self.chunk_counts, x, labels)
        self.seconds_hessian += time.perf_counter() - t0

    def end_pass(self) -> bool:
        """After pass 1: fit the router, then ask for one pass per chunk or replay the full sample;
        after a chunk's pass: solve it, and ask for the next chunk's pass while one is left."""
        if self.fit is not None:
            self._solve_chunk()
            return self.current < len(self.chunks)
        o = self.options
        t0 = time.perf_counter()
        sizes, x = self.sizes, self.sample[:sum(self.sizes)]
        self.sample = None  # the batches live on as views of x
        complete_hessian(self.H_full)

        def fit() -> tuple[RouterFit, dict]:
            return stages.fit_group_router(
                x, o.clusters, o.pca_factor, self.seed, o.kmeans_restarts, o.kmeans_backend, o.small_clusters,
                o.min_cluster_tokens, self.tokens, self.H_full, self.row_sum[0] / int(self.total))

        def on(device, fit: RouterFit, handling: dict) -> tuple[RouterFit, dict]:
            return replace(fit, router=fit.router.to(device), labels=fit.labels.to(device)), handling
        if distributed.world_size() == 1:
            self.fit, self.handling = fit()
        else:  # fitted once, on rank 0, and sent: every rank routes by the same router, bit for bit
            self.fit, self.handling = on(x.device, *distributed.from_leader(
                on("cpu", *fit()) if distributed.rank() == 0 else None))
        self.router_tokens = x.shape[0]
        self.seconds_router = time.perf_counter() - t0
        self.chunks = self.method.chunks(self.fit.router.clusters, self.layers)
        if self.keep is not None:
            return True
        # same batches as SparseGPT's accumulation: one cluster gives its H exactly
        while self.current < len(self.chunks):
            for xb, labels in zip(x.split(sizes), self.fit.labels.split(sizes)):
                self._accumulate(xb, labels)
            self._solve_chunk()
        return False

    def _solve_chunk(self) -> None:
        assert torch.equal(self.chunk_counts, self.counts[self.chunks[self.current]])  # every row seen once
        if self.current == 0:  # the counts are complete after the first chunk's pass
            if self.sums is not None:
                self.means = stages.cluster_means(self.sums, self.counts)
                self.within = stages.within_cluster_hessian(self.H_full, self.means, self.counts)
        complete_hessian(self.H)
        self.method.solve_chunk(self, self.chunks[self.current])
        self.H = self.chunk_counts = None
        self.current += 1


class ExpansionMethod(Method):
    name = "sparse-expansion"
    Options = ExpansionOptions
    shards_calibration = False  # the routers are fit on every batch; the ranks split the clusters

    def label(self) -> str:
        return f"{self.name} ({self.options.clusters})"

    def collector(self, layers: dict[str, nn.Module], tokens: int, group: str = "layer") -> ClusterStats:
        return ClusterStats(self, layers, tokens, group)

    def chunks(self, clusters: int, layers: dict[str, nn.Module]) -> list[slice]:
        """This rank's clusters (all of them with one process) in consecutive chunks whose Hessians
        and solve fit the memory budget; one empty chunk for a rank without clusters (its first pass
        still gives the layer's Hessian and the counts)."""
        mine = distributed.my_share(clusters)
        if mine.stop == mine.start:
            return [mine]
        weights = [linear_weight(module) for module in layers.values()]
        rows, columns = max(W.shape[0] for W in weights), weights[0].shape[1]
        reserve = stages.layer_hessians(self.options.small_clusters) * columns * columns * 4
        budget = solve_budget(self.config.max_memory, weights[0].device, reserve)
        return [slice(mine.start + c.start, mine.start + c.stop) for c in stages.cluster_chunks(
            mine.stop - mine.start, columns, rows, budget)]

    def expert_damping(self, stats: ClusterStats) -> float:
        """The damping `stats`' experts are factored with (stages.expert_damping)."""
        o = self.options
        return stages.expert_damping(o.small_clusters, o.expert_damping, o.percdamp, stats.fit.router.clusters,
                                     stats.H_full.shape[-1], int(stats.counts.sum()))

    def solve_chunk(self, stats: ClusterStats, chunk: slice) -> None:
        """Solve the Hessians of `chunk`'s clusters, factor them, one batched solve per linear;
        the experts are compressed at once and kept in `stats.solved`."""
        cfg, o, counts = self.config, self.options, stats.counts
        if chunk.stop == chunk.start:
            return
        t1 = time.perf_counter()

        def solve_hessians(part: slice) -> torch.Tensor:  # the Hessians the experts of `part` (of the chunk) solve with
            means = None if stats.means is None else stats.means[chunk][part]
            return stages.solve_hessians(stats.H[part], counts[chunk][part], stats.H_full, o.small_clusters,
                                         o.shrink_tokens, int(counts.sum()), means, stats.within)
        damping = self.expert_damping(stats)
        factor = solvers.inverse_hessian_factor(solve_hessians(slice(None)), damping, stats.group, in_place=True)
        steps = o.refine_steps(cfg.bits)
        stats.seconds_hessian += time.perf_counter() - t1
        for name, module in stats.layers.items():
            t2 = time.perf_counter()
            W = linear_weight(module)
            W_hat, info = stages.solve_experts(W, factor, self.sparsity, cfg.bits, o.blocksize)
            out = stats.solved[name]
            t3 = time.perf_counter()
            for e in range(W_hat.shape[0] if steps else 0):  # one expert's solve Hessian at a time
                solvers.refine_on_mask(W.detach()[None], W_hat[e:e + 1], solve_hessians(slice(e, e + 1)),
                                       info.damping[e:e + 1], steps)
            out["refine"] += time.perf_counter() - t3 if steps else 0.0
            part = compress(W_hat.to(module.weight.dtype))
            out["parts"].append(part)
            out["terms"].append(solvers.error_terms(W.detach().float()[None], W_hat, stats.H))
            out["infos"].append(info)
            out["zeros"] += W_hat.numel() - part["values"].numel()
            out["seconds"] += time.perf_counter() - t2
            del W_hat

    def prune_group(self, block: nn.Module, layers: dict[str, nn.Module], stats: ClusterStats, where: str
                    ) -> list[LayerReport]:
        """Swap each linear for its experts (solved chunk by chunk during collection, gathered
        from every rank) sharing the group's router."""
        o, fit, counts, H_full = self.options, stats.fit, stats.counts, stats.H_full
        router, handling = fit.router, dict(stats.handling)
        if o.small_clusters in ("shrink", "pooled"):
            handling["shrink_tokens"] = stages.shrink_tau(o.shrink_tokens, H_full.shape[-1], o.small_clusters)
        handling["expert_damping"] = self.expert_damping(stats)
        handling["empty_clusters_full_hessian"] = torch.nonzero(counts == 0).flatten().tolist()
        solved = _gathered(stats.solved)
        reports = []
        for name, module in layers.items():
            W, out = linear_weight(module), solved[name]
            bias = None if module.bias is None else module.bias.detach().expand(router.clusters, -1).clone()
            experts = SparseExpertLinear(router, concat_compressed(out["parts"]), bias).to(W.device)
            block.set_submodule(name, experts)
            num, den = (torch.cat(t).to(W.device) for t in zip(*out["terms"]))
            overall, per_cluster = stages.combine_errors(W, num, den, counts, H_full)
            reports.append(LayerReport(
                layer=f"{where}.{name}", shape=list(W.shape), tokens=int(counts.sum()),
                sparsity=out["zeros"] / (router.clusters * W.numel()), relative_error=overall,
                seconds_solve=out["seconds"], damping=[d for i in out["infos"] for d in i.damping],
                dead_inputs=[d for i in out["infos"] for d in i.dead_inputs],
                extras={"clusters": router.clusters, "cluster_sizes": counts.tolist(),
                        "cluster_relative_error": per_cluster, "small_clusters": handling,
                        "solve_chunks": len(stats.chunks), "router_tokens": stats.router_tokens,
                        "kmeans_backend": fit.backend, "kmeans_inertia": fit.inertia,
                        "seconds_router": stats.seconds_router, "seconds_hessian": stats.seconds_hessian,
                        "seconds_refine": out["refine"]}))
        return reports


def _gathered(solved: dict) -> dict:
    """Every rank's solved experts and terms, in cluster order (one process: as they are)."""
    if distributed.world_size() == 1:
        return solved
    ranks = distributed.gather_in_rank_order(solved)
    return {name: {"parts": [p for r in ranks for p in r[name]["parts"]],
                   "terms": [t for r in ranks for t in r[name]["terms"]],
                   "infos": [i for r in ranks for i in r[name]["infos"]],
                   "zeros": sum(r[name]["zeros"] for r in ranks),
                   "seconds": max(r[name]["seconds"] for r in ranks),
                   "refine": max(r[name]["refine"] for r in ranks)} for name in solved}


def solve_budget(max_memory: int | None, device: torch.device, reserve: int = 0) -> int | None:
    """Bytes the cluster Hessians and solve may use: --max-memory, else 90% of the device's free
    memory (a CUDA device's, or the host's MemAvailable on a CPU; None where unknown) less
    `reserve`, what will be allocated beside them (the layer's Hessians)."""
    if max_memory is not None:
        return max_memory
    free = free_device_bytes(device) if device.type == "cuda" else available_host_bytes()
    return None if free is None else int(SOLVE_SHARE * max(0, free - reserve))
