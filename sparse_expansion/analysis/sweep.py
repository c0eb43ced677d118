"""The sparsity-sweep experiment: distance to N(0, 1) of the neurons' outputs as the layer is
pruned harder.
"""
from __future__ import annotations

import time
from pathlib import Path

from .common import LayerAnalysis, _log, _mean, _pyplot, _save, _short, _write_csv, _write_json


def experiment_sparsity_sweep(layer: LayerAnalysis, out: Path, methods: tuple[str, ...] = ("sparsegpt", "magnitude")
                              ) -> dict:
    """Distance to N(0, 1) of neurons' outputs as the layer is pruned from 0% to 95% (SparseGPT and
    magnitude). Writes sparsity_sweep.png, sparsity_sweep.csv, sparsity_sweep.json."""
    cfg, written, rows = layer.config, [], []
    for name in layer.names:
        wn = layer.wasserstein(name)
        shown = layer.ranking(name)[:cfg.show].tolist()
        for method in methods:
            t0 = time.perf_counter()
            for rate in cfg.sweep_rates:
                g = layer.w1_gaussian(name, method if rate > 0 else "dense", rate)
                row = {"linear": name, "method": method, "sparsity": float(rate),
                       "wasserstein_mean": _mean(g, wn), "all_median": float(g.median()), "all_mean": _mean(g)}
                for r, i in enumerate(shown):
                    row[f"top{r + 1}"] = float(g[i])
                    row[f"top{r + 1}_neuron"] = i
                rows.append(row)
            first, last = rows[-len(cfg.sweep_rates)], rows[-1]
            _log(cfg, f"[sparsity-sweep] {name} {method}: W1 to N(0,1) of the Wasserstein neurons "
                      f"{first['wasserstein_mean']:.3f} ({first['sparsity']:g}) -> {last['wasserstein_mean']:.3f} "
                      f"({last['sparsity']:g}) ({time.perf_counter() - t0:.1f} s)")
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "sparsity_sweep.csv", rows, written)
    plt = _pyplot(cfg)
    if plt is not None:
        n = len(layer.names)
        fig, axes = plt.subplots(n, len(methods), figsize=(4.8 * len(methods), 3.6 * n), squeeze=False)
        for k, name in enumerate(layer.names):
            for m, method in enumerate(methods):
                ax = axes[k][m]
                mine = [r for r in rows if r["linear"] == name and r["method"] == method]
                xs = [100 * r["sparsity"] for r in mine]
                for r in range(cfg.show):
                    if f"top{r + 1}" in mine[0]:
                        ax.plot(xs, [q[f"top{r + 1}"] for q in mine], "-o", ms=2.5, lw=1, alpha=0.7,
                                label=f"#{mine[0][f'top{r + 1}_neuron']}")
                ax.plot(xs, [q["wasserstein_mean"] for q in mine], "-s", ms=3, color="C3", lw=2.2,
                        label=f"mean, top {cfg.top_percent:g}%")
                ax.plot(xs, [q["all_median"] for q in mine], "--", color="k", lw=1.5, label="median, all neurons")
                ax.set_xlabel("sparsity of the layer (%)")
                ax.set_ylabel("W1 of output to N(0,1)")
                ax.set_title(f"block {layer.block} {_short(name)}, {method}")
                ax.legend(fontsize=7)
        _save(fig, out / "sparsity_sweep.png", written)
    summary = {"block": layer.block, "rows": rows}
    summary["files"] = written + [str(out / "sparsity_sweep.json")]
    _write_json(out / "sparsity_sweep.json", summary, written)
    return summary
