"""PNG plots of the results (needs matplotlib)."""
from __future__ import annotations

import math

from .config import STAGES


def write_plots(results: dict, prefix: str) -> list[str]:
    """Stacked bars of seconds per stage; routed and dense time against token count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grid(n, height):
        cols = min(4, n)
        rows_ = math.ceil(n / cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(3.4 * cols + 0.6, height * rows_), squeeze=False)
        flat = list(axes.flat)
        for ax in flat[n:]:
            ax.axis("off")
        return fig, flat[:n]

    written = []

    def save(fig, path: str) -> None:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    rows = [r for r in results["pruning"] if r["impl"] in ("library", "reference")]
    if rows:
        groups = list(dict.fromkeys((r["shape"], r["sparsity"]) for r in rows))
        fig, axes = grid(len(groups), 3.4)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, (shape, sp) in zip(axes, groups):
            sub = [r for r in rows if r["shape"] == shape and r["sparsity"] == sp]
            labels = [f"{'SGPT' if r['method'] == 'sparsegpt' else 'SE'}\n{r['impl'][:3]}" for r in sub]
            bottom = [0.0] * len(sub)
            for i, s in enumerate(STAGES):
                vals = [r[f"{s}_s"] for r in sub]
                ax.bar(labels, vals, bottom=bottom, label=s, color=colors[i % len(colors)])
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_title(f"{shape} {sp}", fontsize=9)
            ax.set_ylabel("seconds", fontsize=8)
            ax.tick_params(labelsize=8)
        axes[0].legend(fontsize=7)
        fig.suptitle("pruning time per stage (lib = library, ref = one cluster at a time)", fontsize=10)
        save(fig, f"{prefix}_stages.png")
    inf = results["inference"]
    if inf:
        groups = list(dict.fromkeys((r["shape"], r["sparsity"]) for r in inf))
        fig, axes = grid(len(groups), 3.2)
        for ax, (shape, sp) in zip(axes, groups):
            sub = [r for r in inf if r["shape"] == shape and r["sparsity"] == sp]
            T = [r["tokens"] for r in sub]
            ax.loglog(T, [r["dense_ms"] for r in sub], "o-", label="dense nn.Linear")
            ax.loglog(T, [r["routed_ms"] for r in sub], "s-", label="routed (incl. routing)")
            ax.loglog(T, [r["routing_ms"] for r in sub], ":", label="routing only")
            if any(r["routed24_ms"] is not None for r in sub):
                ax.loglog(T, [r["routed24_ms"] for r in sub], "^-", label="routed 2:4")
            ax.set_title(f"{shape} {sp}", fontsize=9)
            ax.set_xlabel("tokens", fontsize=8)
            ax.set_ylabel("ms", fontsize=8)
            ax.tick_params(labelsize=8)
        handles = {}
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        axes[0].legend(handles.values(), handles.keys(), fontsize=7)
        fig.suptitle("routed forward (SparseExpertLinear, routing included) vs dense nn.Linear", fontsize=10)
        save(fig, f"{prefix}_routed.png")
    return written
