"""The ablation experiment: the model's perplexity when only a few rows of every FFN linear are
pruned, the rows picked as Wasserstein neurons, at random, by output variance or by weight norm.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .. import solvers
from ..evaluate import perplexity
from ..methods import HessianStats
from ..models import decoder_blocks, linear_weight, set_linear_weight
from ..sparsity import Sparsity
from .common import (AnalysisConfig, _kept_positions, _log, _pyplot, _save, _short, _write_csv, _write_json,
                     capture_linear_inputs, resolve_linears)
from .metrics import top_count, w1_to_gaussian


SELECTIONS = ("wasserstein", "random", "variance", "weight_norm")


@torch.no_grad()
def experiment_ablation(model: nn.Module, calib_ids: torch.Tensor, eval_ids: torch.Tensor, out: Path,
                        config: AnalysisConfig | None = None) -> dict:
    """Targeted pruning: in every block, prune only k = top_percent% of the rows of each analysed FFN
    linear (default gate_proj and up_proj) at `ablation_sparsity` with SparseGPT, the rows picked
    by distance to N(0, 1) (Wasserstein neurons), at random, by output variance or by weight norm
    (largest first); report the model's perplexity on eval_ids for each.

    One pass of the dense model over calib_ids captures the linears' inputs in every block
    (`capture_linear_inputs`, block by block as the driver runs them); each block's Hessian and
    inverse factor serve all selections (the selections are not applied sequentially: with 3% of
    the rows touched, later blocks' inputs barely change). The model is restored to its dense
    weights afterwards. Writes ablation.png, ablation.csv, ablation.json.
    """
    cfg = config or AnalysisConfig()
    names = resolve_linears(model, cfg.linears)
    blocks = decoder_blocks(model)
    t0 = time.perf_counter()
    inputs = capture_linear_inputs(model, calib_ids, [b.get_submodule(names[0]) for b in blocks], cfg.batch_size)
    keep = _kept_positions(calib_ids.shape[1], cfg.skip_first).repeat(calib_ids.shape[0])
    t_capture = time.perf_counter() - t0
    sparsity = Sparsity(cfg.ablation_sparsity)
    gen = torch.Generator().manual_seed(cfg.seed)
    random_keys = ["random"] + [f"random{s + 1}" for s in range(1, cfg.ablation_random_seeds)]
    plans: dict[str, list] = {s: [] for s in ("wasserstein", *random_keys, "variance", "weight_norm")}
    overlap = {"random": [], "variance": [], "weight_norm": []}
    t0 = time.perf_counter()
    for b, block in enumerate(blocks):
        batches = inputs[b]
        stats = HessianStats(batches[0].shape[1], batches[0].device)
        for xb in batches:
            stats.add_batch(xb)
        factor = solvers.inverse_hessian_factor(stats.H, name=f"block{b}")
        x = torch.cat(batches)[keep.to(batches[0].device)]
        for name in names:
            module = block.get_submodule(name)
            W = linear_weight(module).detach().float()
            y = x @ W.t()
            R = W.shape[0]
            k = top_count(R, cfg.top_percent)
            picks = {"wasserstein": torch.argsort(w1_to_gaussian(y), descending=True)[:k].cpu(),
                     "variance": torch.argsort(y.var(0), descending=True)[:k].cpu(),
                     "weight_norm": torch.argsort(W.norm(dim=1), descending=True)[:k].cpu()}
            for key in random_keys:
                picks[key] = torch.randperm(R, generator=gen)[:k]
            wn = set(picks["wasserstein"].tolist())
            for key in overlap:
                overlap[key].append(len(wn & set(picks[key].tolist())) / k)
            for key, rows in picks.items():
                rows = rows.sort().values.to(W.device)
                W_hat, _ = solvers.sparsegpt(W[rows][None], factor, sparsity)
                plans[key].append((module, rows, W_hat[0]))
        del inputs[b][:]
    t_solve = time.perf_counter() - t0
    _log(cfg, f"[ablation] captured {len(blocks)} blocks' inputs ({t_capture:.1f} s), solved "
              f"{len(plans)} selections x {len(blocks) * len(names)} linears ({t_solve:.1f} s)")

    def evaluate(label):
        t = time.perf_counter()
        r = perplexity(model, eval_ids, cfg.batch_size, progress=False)
        _log(cfg, f"[ablation] {label}: perplexity {r['perplexity']:.4f} ({time.perf_counter() - t:.1f} s)")
        return r

    results = {"dense": evaluate("dense")}
    for key, plan in plans.items():
        saved = []
        try:
            for module, rows, W_rows in plan:
                W = linear_weight(module).detach().float().clone()
                saved.append((module, W.clone()))
                W[rows] = W_rows
                set_linear_weight(module, W)
            results[key] = evaluate(key)
        finally:
            for module, W in reversed(saved):
                set_linear_weight(module, W)
    k_rows = {n: top_count(linear_weight(blocks[0].get_submodule(n)).shape[0], cfg.top_percent) for n in names}
    table = [{"selection": key, "perplexity": r["perplexity"], "nll": r["nll"],
              "delta_vs_dense": r["perplexity"] - results["dense"]["perplexity"]} for key, r in results.items()]
    random_ppl = torch.tensor([results[k]["perplexity"] for k in random_keys], dtype=torch.float64)
    out.mkdir(parents=True, exist_ok=True)
    written: list = []
    _write_csv(out / "ablation.csv", table, written)
    plt = _pyplot(cfg)
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        keys = [t["selection"] for t in table if t["selection"] != "dense"]
        vals = [results[k]["perplexity"] for k in keys]
        colors = ["C3" if k == "wasserstein" else "0.55" for k in keys]
        ax.bar(range(len(keys)), vals, color=colors)
        ax.axhline(results["dense"]["perplexity"], color="k", ls="--", lw=1, label="dense")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(keys)), keys)
        lo = min(vals + [results["dense"]["perplexity"]])
        ax.set_ylim(lo * 0.98, max(vals) * 1.01)
        ax.set_ylabel("perplexity (held-out)")
        ax.set_title(f"{k_rows[names[0]]} rows ({cfg.top_percent:g}%) of each {'/'.join(_short(n) for n in names)} "
                     f"in all {len(blocks)} blocks pruned {cfg.ablation_sparsity:.0%} (SparseGPT)", fontsize=9)
        ax.legend(fontsize=8)
        _save(fig, out / "ablation.png", written)
    summary = {"linears": list(names), "blocks": len(blocks), "rows_per_linear": k_rows,
               "sparsity_of_selected_rows": cfg.ablation_sparsity,
               "calibration_tokens": int(calib_ids.numel()), "eval_tokens": int(eval_ids.numel()),
               "results": results, "table": table,
               "random_mean_perplexity": float(random_ppl.mean()),
               "random_std_perplexity": float(random_ppl.std()) if len(random_keys) > 1 else None,
               "mean_overlap_with_wasserstein": {k: sum(v) / len(v) for k, v in overlap.items()},
               "seconds": {"capture": t_capture, "solve": t_solve}}
    summary["files"] = written + [str(out / "ablation.json")]
    _write_json(out / "ablation.json", summary, written)
    return summary
