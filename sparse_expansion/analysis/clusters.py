"""The clusters experiment: distance of the pruned outputs to the dense ones against the number
of Sparse Expansion clusters.
"""
from __future__ import annotations

import time
from pathlib import Path

from .common import LayerAnalysis, _log, _mean, _pyplot, _save, _short, _write_csv, _write_json


def experiment_clusters(layer: LayerAnalysis, out: Path) -> dict:
    """W1(sparse, dense) of the top Wasserstein neurons against the number of Sparse Expansion
    clusters (1 cluster = SparseGPT). Writes clusters.png, clusters.csv, clusters.json."""
    cfg, written, rows = layer.config, [], []
    checks = {}
    for name in layer.names:
        wn = layer.wasserstein(name)
        for K in cfg.cluster_counts:
            t0 = time.perf_counter()
            d = layer.w1_to_dense(name, "sparse-expansion", cfg.sparsity, K)
            row = {"linear": name, "clusters": K, "wasserstein_mean": _mean(d, wn), "all_mean": _mean(d)}
            for r, i in enumerate(layer.ranking(name)[:cfg.show].tolist()):
                row[f"top{r + 1}_neuron{i}"] = float(d[i])
            rows.append(row)
            _log(cfg, f"[clusters] {name} K={K}: W1(sparse, dense)/σ mean over Wasserstein neurons "
                      f"{row['wasserstein_mean']:.4f}, all {row['all_mean']:.4f} ({time.perf_counter() - t0:.1f} s)")
        if 1 in cfg.cluster_counts:  # one cluster must be SparseGPT exactly
            diff = (layer.outputs("sparse-expansion", cfg.sparsity, 1)[name]
                    - layer.outputs("sparsegpt", cfg.sparsity)[name]).abs().max()
            checks[name] = {"max_abs_diff_1_cluster_vs_sparsegpt": float(diff)}
    out.mkdir(parents=True, exist_ok=True)
    # one CSV: per-neuron columns differ between linears, so write them long-form
    long_rows = []
    for row in rows:
        for key, val in row.items():
            if key not in ("linear", "clusters"):
                long_rows.append({"linear": row["linear"], "clusters": row["clusters"], "series": key,
                                  "w1_to_dense_over_std": val})
    _write_csv(out / "clusters.csv", long_rows, written)
    plt = _pyplot(cfg)
    if plt is not None:
        n = len(layer.names)
        fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 3.8), squeeze=False)
        for k, name in enumerate(layer.names):
            ax = axes[0][k]
            mine = [r for r in rows if r["linear"] == name]
            Ks = [r["clusters"] for r in mine]
            for key in [c for c in mine[0] if c.startswith("top")]:
                ax.plot(Ks, [r[key] for r in mine], "-o", ms=3, lw=1, alpha=0.7, label=key.split("_")[1])
            ax.plot(Ks, [r["wasserstein_mean"] for r in mine], "-s", color="C3", lw=2.2,
                    label=f"mean, top {cfg.top_percent:g}%")
            ax.plot(Ks, [r["all_mean"] for r in mine], "--", color="k", lw=1.5, label="mean, all neurons")
            ax.set_xscale("log", base=2)
            ax.set_xticks(Ks, [str(x) for x in Ks])
            ax.set_xlabel("clusters (1 = SparseGPT)")
            ax.set_ylabel("W1(sparse, dense) / σ_dense")
            ax.set_title(f"block {layer.block} {_short(name)} at {cfg.sparsity:g} sparsity")
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        _save(fig, out / "clusters.png", written)
    summary = {"block": layer.block, "sparsity": cfg.sparsity, "rows": rows, "checks": checks}
    summary["files"] = written + [str(out / "clusters.json")]
    _write_json(out / "clusters.json", summary, written)
    return summary
