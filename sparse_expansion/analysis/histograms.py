"""The histograms experiment: output distributions of dense, SparseGPT and Sparse Expansion for
the top Wasserstein neurons.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .common import LayerAnalysis, _pyplot, _save, _short, _write_csv, _write_json
from .metrics import w1_between


def experiment_histograms(layer: LayerAnalysis, out: Path) -> dict:
    """Output histograms of dense, SparseGPT and Sparse Expansion for the top Wasserstein neurons
    of each linear. Writes histograms.png, histograms.csv, histograms.json."""
    cfg, written, rows = layer.config, [], []
    plt = _pyplot(cfg)
    n = len(layer.names)
    fig = axes = None
    if plt is not None:
        fig, axes = plt.subplots(n, cfg.show, figsize=(3.6 * cfg.show, 3.0 * n), squeeze=False)
    for k, name in enumerate(layer.names):
        dense = layer.dense(name)
        sgpt = layer.outputs("sparsegpt", cfg.sparsity)[name]
        se = layer.outputs("sparse-expansion", cfg.sparsity, cfg.clusters)[name]
        d_sgpt = layer.w1_to_dense(name, "sparsegpt", cfg.sparsity)
        d_se = layer.w1_to_dense(name, "sparse-expansion", cfg.sparsity, cfg.clusters)
        g_dense = layer.w1_gaussian(name)
        g_sgpt = layer.w1_gaussian(name, "sparsegpt", cfg.sparsity)
        g_se = layer.w1_gaussian(name, "sparse-expansion", cfg.sparsity, cfg.clusters)
        raw_sgpt = w1_between(sgpt, dense).cpu()
        raw_se = w1_between(se, dense).cpu()
        for r, i in enumerate(layer.ranking(name)[:cfg.show].tolist()):
            rows.append({"linear": name, "neuron": i, "rank": r, "w1_gaussian_dense": float(g_dense[i]),
                         "w1_gaussian_sparsegpt": float(g_sgpt[i]), "w1_gaussian_expansion": float(g_se[i]),
                         "w1_sparsegpt_to_dense": float(raw_sgpt[i]), "w1_expansion_to_dense": float(raw_se[i]),
                         "w1_sparsegpt_to_dense_over_std": float(d_sgpt[i]),
                         "w1_expansion_to_dense_over_std": float(d_se[i]),
                         "dense_mean": float(dense[:, i].mean()), "dense_std": float(dense[:, i].std())})
            if axes is not None:
                ax = axes[k][r]
                vals = [dense[:, i].cpu(), sgpt[:, i].cpu(), se[:, i].cpu()]
                lo = min(float(torch.quantile(v, 0.001)) for v in vals)
                hi = max(float(torch.quantile(v, 0.999)) for v in vals)
                bins = torch.linspace(lo, hi, 80).numpy()
                ax.hist(vals[0].numpy(), bins=bins, histtype="stepfilled", color="0.75", label="dense")
                ax.hist(vals[1].numpy(), bins=bins, histtype="step", color="C3", lw=1.3, label="SparseGPT")
                ax.hist(vals[2].numpy(), bins=bins, histtype="step", color="C0", lw=1.3,
                        label=f"Sparse Expansion ({cfg.clusters})")
                ax.set_title(f"{_short(name)} #{i} (W1 to N(0,1): {float(g_dense[i]):.2f})\n"
                             f"W1 to dense: SparseGPT {float(raw_sgpt[i]):.3f}, SE {float(raw_se[i]):.3f}",
                             fontsize=8.5)
                ax.set_yticks([])
                if r == 0:
                    ax.legend(fontsize=7)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "histograms.csv", rows, written)
    if fig is not None:
        fig.suptitle(f"block {layer.block}: top Wasserstein neurons, outputs on {layer.tokens} held-out tokens, "
                     f"{cfg.sparsity:g} sparsity", fontsize=10)
        _save(fig, out / "histograms.png", written)
    summary = {"block": layer.block, "sparsity": cfg.sparsity, "clusters": cfg.clusters, "neurons": rows,
               "prune_reports": {f"{m}@{r:g}" + (f"x{c}" if c else ""): v for (m, r, c), v in layer.reports.items()}}
    summary["files"] = written + [str(out / "histograms.json")]
    _write_json(out / "histograms.json", summary, written)
    return summary
