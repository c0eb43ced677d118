"""Layer-level study of Sparse Expansion's small-cluster rules on real SmolLM2 (or Gemma 3) inputs.

For some blocks, the dense model's FFN inputs (gate_proj's, which up_proj shares, and down_proj's)
are captured on three token sets: the protocol's calibration windows (32 x 512 wiki-train, seed 0),
8 other wiki-train windows (seed 123: held-out text of the calibration's kind) and 8 windows of
the sotu speeches (held-out text of another kind). Each variant prunes the linear at 50% (or
--sparsity) from the calibration inputs alone, and its error ‖(W − Ŵ)X‖² on each token set
(Sparse Expansion: each token through the expert its router picks) is printed relative to
SparseGPT's (1% damping): below 1 is better. Choose settings by the wiki-train column; sotu is
the check on text nothing was chosen on.

    python benchmarks/layer_study.py --blocks 3,12,21,28 \\
        --variants sparsegpt:damp=0.1,shrink,pooled,pooled:tau=1:damp=0.01

Variant = rule[:key=value...]: rule sparsegpt, shrink, pooled or damping (methods/expansion/stages.py's rules);
keys: tau (in units of the layer's input dimension d), damp (the experts' damping), k (clusters,
default 16), pca (the PCA factor, default 32), refine (conjugate-gradient steps re-solving the
weights on the mask, solvers.refine_on_mask; default 0), soft (soft assignment for the experts'
Hessians and means: each token weighted into every cluster by a softmax of its squared PCA
distances minus its nearest one, over soft × their mean; routing stays hard) and top (with soft:
only each token's `top` nearest clusters, weights renormalized). Results: a table, and JSON in
benchmarks/results/layer_study.json. Captured inputs are cached in ~/.cache/sparse_expansion.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparse_expansion.methods.expansion import stages
from sparse_expansion import solvers
from sparse_expansion.data import calibration_windows, evaluation_windows
from sparse_expansion.kernels.hessian import accumulate_hessian, complete_hessian
from sparse_expansion.storage.loading import SMOLLM2, load_model
from sparse_expansion.sparsity import Sparsity

LINEARS = ("gate_proj", "down_proj")
SETS = ("calib", "wikitrain", "sotu")
CACHE = Path.home() / ".cache" / "sparse_expansion"
RESULTS = Path(__file__).parent / "results" / "layer_study.json"


def capture(model_name: str, blocks: list[int]) -> dict:
    """{(set, block, linear): inputs [N, d] fp32, ("W", block, linear): weight}, cached on disk."""
    path = CACHE / f"layer_study_{model_name}_{'-'.join(map(str, blocks))}.pt"
    if path.exists():
        return torch.load(path)
    model, tok = load_model(model_name)
    layers = model.model.layers
    token_sets = {"calib": calibration_windows(tok, "wiki", 32, 512, seed=0),
                  "wikitrain": calibration_windows(tok, "wiki", 8, 512, seed=123),
                  "sotu": evaluation_windows(tok, "sotu", 512, 8, spread=True)}
    out: dict = {}
    for name, ids in token_sets.items():
        hooks = [getattr(layers[b].mlp, lin).register_forward_pre_hook(
            lambda m, a, key=(name, b, lin): out.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]).float()))
            for b in blocks for lin in LINEARS]
        with torch.no_grad():
            for s in range(0, ids.shape[0], 8):
                model(ids[s:s + 8], use_cache=False)
        for h in hooks:
            h.remove()
    out = {k: torch.cat(v) for k, v in out.items()}
    out.update({("W", b, lin): getattr(layers[b].mlp, lin).weight.detach().float().clone()
                for b in blocks for lin in LINEARS})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def hessians(x: torch.Tensor, labels: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    H = torch.zeros(k, x.shape[1], x.shape[1])
    counts = torch.zeros(k, dtype=torch.long)
    accumulate_hessian(H, counts, x, labels)
    return complete_hessian(H), counts


def parse_variant(text: str) -> tuple[str, dict]:
    rule, *pairs = text.split(":")
    return rule, {key: float(value) for key, value in (p.split("=") for p in pairs)}


def prune(variant: str, W: torch.Tensor, x: torch.Tensor, sparsity: Sparsity, seed: int):
    """(experts [k, R, C], router or None) of one variant from the calibration inputs x."""
    rule, opts = parse_variant(variant)
    d = x.shape[1]
    H_full, total = hessians(x, None, 1)
    steps = int(opts.get("refine", 0))
    if rule == "sparsegpt":
        factor = solvers.inverse_hessian_factor(H_full, opts.get("damp", 0.01))
        W_hat, info = solvers.sparsegpt(W[None], factor, sparsity)
        return solvers.refine_on_mask(W[None], W_hat, H_full, info.damping, steps), None
    k = int(opts.get("k", 16))
    fit, _ = stages.fit_group_router(x, k, int(opts.get("pca", 32)), seed, 10, "torch", rule, 0, x.shape[0], H_full,
                                     x.double().mean(0))
    if "soft" in opts:
        H_c, counts, means = soft_statistics(x, fit.router, opts["soft"], int(opts.get("top", k)))
    else:
        H_c, counts = hessians(x, fit.labels, k)
        sums = torch.zeros(k, d, dtype=torch.float64)
        stages.add_cluster_sums(sums, x, fit.labels)
        means = stages.cluster_means(sums, counts)
    within = stages.within_cluster_hessian(H_full, means, counts)
    tau = opts["tau"] * d if "tau" in opts else None
    H_solve = stages.solve_hessians(H_c, counts, H_full, rule, tau, means=means, within=within)
    damping = stages.expert_damping(rule, opts.get("damp"), 0.01, k, d, x.shape[0])
    W_hat, info = stages.solve_experts(W, solvers.inverse_hessian_factor(H_solve, damping), sparsity, None, 128)
    return solvers.refine_on_mask(W[None], W_hat, H_solve, info.damping, steps), fit.router


def soft_statistics(x: torch.Tensor, router, temperature: float, top: int):
    """(Hessians [k, d, d], token counts rounded [k], means [k, d] fp64) of the clusters with each
    token weighted into its `top` nearest clusters by a softmax of −(dist² − nearest dist²) /
    (temperature × mean nearest dist²) in the router's PCA space."""
    d2 = torch.cdist(router.project(x), router.centroids).square()
    nearest = d2.min(1, keepdim=True).values
    weights = torch.softmax(-(d2 - nearest) / (temperature * nearest.mean()), dim=1)
    kept = weights.topk(top, dim=1).indices
    weights = torch.zeros_like(weights).scatter_(1, kept, weights.gather(1, kept))
    weights /= weights.sum(1, keepdim=True)
    n = weights.sum(0)
    H = torch.stack([(x * w[:, None]).T @ x * (2.0 / m) for w, m in zip(weights.T, n)])
    return H, n.round().long(), (weights.T.double() @ x.double()) / n.double()[:, None]


def error(W: torch.Tensor, W_hat: torch.Tensor, router, x: torch.Tensor) -> float:
    labels = torch.zeros(x.shape[0], dtype=torch.long) if router is None else router.assign(x)
    return sum(float((x[labels == c] @ (W_hat[c] - W).T).square().sum()) for c in range(W_hat.shape[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--blocks", default="3,12,21,28")
    p.add_argument("--variants", default="shrink,pooled")
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    variants = args.variants.split(",")
    sparsity = Sparsity.parse(args.sparsity)
    data = capture(args.model, blocks)
    rows = []
    print(f"error relative to SparseGPT's ({' / '.join(SETS)}), {args.model}, sparsity {sparsity}")
    for b in blocks:
        for lin in LINEARS:
            W, x = data[("W", b, lin)], data[("calib", b, lin)]
            base_hat, _ = prune("sparsegpt", W, x, sparsity, args.seed)
            base = {s: error(W, base_hat, None, data[(s, b, lin)]) for s in SETS}
            cells = []
            for v in variants:
                t0 = time.perf_counter()
                W_hat, router = prune(v, W, x, sparsity, args.seed)
                ratio = {s: error(W, W_hat, router, data[(s, b, lin)]) / base[s] for s in SETS}
                rows.append({"model": args.model, "block": b, "linear": lin, "variant": v, "sparsity": str(sparsity),
                             "seconds": time.perf_counter() - t0, **ratio})
                cells.append(f"{v} {' / '.join(f'{ratio[s]:.3f}' for s in SETS)}")
            print(f"block {b:2d} {lin:9s} | " + " | ".join(cells), flush=True)
    print("mean over layers:")
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        print(f"  {v:32s} " + " / ".join(f"{sum(r[s] for r in mine) / len(mine):.3f}" for s in SETS))
    path = Path(args.output)
    kept = json.loads(path.read_text()) if path.exists() else []
    key = lambda r: (r["model"], r["block"], r["linear"], r["variant"], r["sparsity"])  # noqa: E731
    new = {key(r) for r in rows}
    path.write_text(json.dumps([r for r in kept if key(r) not in new] + rows, indent=1))


if __name__ == "__main__":
    main()
