"""The neurons experiment: Wasserstein neurons of the analysed layer, their weight norms and
mapping difficulty, and how far SparseGPT and Sparse Expansion move their outputs.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .common import LayerAnalysis, _log, _mean, _pyplot, _quantiles, _save, _short, _write_csv, _write_json
from .metrics import mapping_difficulty, pearson, spearman


def experiment_neurons(layer: LayerAnalysis, out: Path) -> dict:
    """Wasserstein neurons of the layer: their distances, weight norms, mapping difficulty, and how
    far SparseGPT and Sparse Expansion move their outputs. Writes neurons.csv/json and
    neurons_distance.png, neurons_mapping.png."""
    cfg, written, rows = layer.config, [], []
    summary = {"block": layer.block, "tokens": layer.tokens, "sparsity": cfg.sparsity, "clusters": cfg.clusters,
               "top_percent": cfg.top_percent, "linears": {}}
    plt = _pyplot(cfg)
    figs = None
    if plt is not None:
        n = len(layer.names)
        figs = (plt.subplots(1, n, figsize=(4.6 * n, 3.6), squeeze=False),
                plt.subplots(1, n, figsize=(4.6 * n, 3.8), squeeze=False))
    for k, name in enumerate(layer.names):
        t0 = time.perf_counter()
        W = layer.weights[name]
        R = W.shape[0]
        w1 = layer.w1_gaussian(name)
        wn = layer.wasserstein(name)
        is_wn = torch.zeros(R, dtype=torch.bool)
        is_wn[wn] = True
        norms = W.double().norm(dim=1).cpu()
        std = layer.dense(name).double().std(0, unbiased=False).cpu()
        md, md_info = mapping_difficulty(layer.x, layer.dense(name), cfg.pairs, cfg.seed)
        md = md.cpu()
        d_sgpt = layer.w1_to_dense(name, "sparsegpt", cfg.sparsity)
        d_se = layer.w1_to_dense(name, "sparse-expansion", cfg.sparsity, cfg.clusters)
        raw_sgpt, raw_se = d_sgpt * std, d_se * std
        rank = torch.empty(R, dtype=torch.long)
        rank[layer.ranking(name)] = torch.arange(R)
        norm_pct = torch.argsort(torch.argsort(norms)).double() / max(R - 1, 1) * 100
        for i in range(R):
            rows.append({"linear": name, "neuron": i, "rank": int(rank[i]), "wasserstein": int(is_wn[i]),
                         "w1_gaussian": float(w1[i]), "weight_norm": float(norms[i]), "output_std": float(std[i]),
                         "mapping_difficulty": float(md[i]),
                         "w1_sparsegpt_to_dense": float(raw_sgpt[i]), "w1_expansion_to_dense": float(raw_se[i]),
                         "w1_sparsegpt_to_dense_over_std": float(d_sgpt[i]),
                         "w1_expansion_to_dense_over_std": float(d_se[i])})
        rest = ~is_wn
        summary["linears"][name] = {
            "neurons": R, "wasserstein_neurons": int(is_wn.sum()), "fraction": float(is_wn.float().mean()),
            "threshold_w1": float(w1[wn].min()),
            "w1_gaussian_all": _quantiles(w1), "w1_gaussian_wasserstein": _quantiles(w1[wn]),
            "weight_norm": {"wasserstein_mean": _mean(norms, is_wn), "others_mean": _mean(norms, rest),
                            "ratio": _mean(norms, is_wn) / _mean(norms, rest),
                            "wasserstein_mean_percentile": _mean(norm_pct, is_wn),
                            "pearson_with_w1": pearson(norms, w1), "spearman_with_w1": spearman(norms, w1)},
            "mapping_difficulty": {"wasserstein_mean": _mean(md, is_wn), "others_mean": _mean(md, rest),
                                   "pearson_with_w1": pearson(md, w1), "spearman_with_w1": spearman(md, w1),
                                   **md_info},
            "w1_to_dense_over_std": {
                "sparsegpt": {"wasserstein_mean": _mean(d_sgpt, is_wn), "others_mean": _mean(d_sgpt, rest)},
                "sparse_expansion": {"wasserstein_mean": _mean(d_se, is_wn), "others_mean": _mean(d_se, rest)},
                "expansion_closer_fraction": {"wasserstein": float((d_se < d_sgpt)[is_wn].float().mean()),
                                              "all": float((d_se < d_sgpt).float().mean())}},
            "w1_to_dense_raw": {
                "sparsegpt": {"wasserstein_mean": _mean(raw_sgpt, is_wn), "others_mean": _mean(raw_sgpt, rest)},
                "sparse_expansion": {"wasserstein_mean": _mean(raw_se, is_wn), "others_mean": _mean(raw_se, rest)}},
            "output_std": {"wasserstein_mean": _mean(std, is_wn), "others_mean": _mean(std, rest)},
        }
        _log(cfg, f"[neurons] {name}: {int(is_wn.sum())}/{R} Wasserstein neurons (W1 ≥ {float(w1[wn].min()):.3f}, "
                  f"median of all {float(w1.median()):.3f}); MD~W1 spearman {spearman(md, w1):.2f} "
                  f"({time.perf_counter() - t0:.1f} s)")
        if figs is not None:
            ax = figs[0][1][0][k]
            bins = torch.linspace(0, float(w1.max()) * 1.02, 60).numpy()
            ax.hist(w1[rest].numpy(), bins=bins, color="0.6", label="other neurons")
            ax.hist(w1[wn].numpy(), bins=bins, color="C3", label=f"top {cfg.top_percent:g}% (Wasserstein)")
            ax.set_yscale("log")
            ax.set_xlabel("W1 of standardised output to N(0,1)")
            ax.set_ylabel("neurons")
            ax.set_title(f"block {layer.block} {_short(name)}")
            ax.legend(fontsize=8)
            ax = figs[1][1][0][k]
            ax.scatter(w1[rest].numpy(), md[rest].numpy(), s=4, color="0.5", alpha=0.5, label="other neurons")
            ax.scatter(w1[wn].numpy(), md[wn].numpy(), s=9, color="C3", label="Wasserstein neurons")
            ax.set_xlabel("W1 to N(0,1)")
            ax.set_ylabel("mapping difficulty")
            ax.set_title(f"{_short(name)}: spearman {spearman(md, w1):.2f}, pearson {pearson(md, w1):.2f}")
            ax.legend(fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "neurons.csv", rows, written)
    if figs is not None:
        _save(figs[0][0], out / "neurons_distance.png", written)
        _save(figs[1][0], out / "neurons_mapping.png", written)
    summary["files"] = written + [str(out / "neurons.json")]
    _write_json(out / "neurons.json", summary, written)
    return summary
