"""Quality on held-out tokens and routed inference time of pruned layers."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from sparse_expansion import solvers
from sparse_expansion.methods.expansion.experts import SparseExpertLinear
from sparse_expansion.sparsity import Sparsity

from .config import BenchConfig
from .inputs import LayerInputs
from .measure import time_calls
from .stages import PruneRun


@torch.no_grad()
def heldout_error(W: torch.Tensor, x: torch.Tensor, forward, chunk: int = 4096) -> float:
    """Σ‖Wx − f(x)‖² / Σ‖Wx‖² over held-out tokens x [M, d_in] (fp32 math, fp64 sums)."""
    num = den = 0.0
    Wf = W.float()
    for xb in x.split(chunk):
        xb = xb.float()
        y = F.linear(xb, Wf)
        num += float((y - forward(xb).float()).double().square().sum())
        den += float(y.double().square().sum())
    return num / max(den, 1e-30)


def run_heldout_error(W: torch.Tensor, x: torch.Tensor, run: PruneRun) -> float:
    """Held-out error of a pruning run: one matrix, or experts with tokens routed by its router."""
    if run.router is None:
        return heldout_error(W, x, lambda xb: F.linear(xb, run.W_hat[0]))
    return heldout_error(W, x, SparseExpertLinear(run.router, run.W_hat))


def baseline_quality(W: torch.Tensor, layer: LayerInputs, sparsity: Sparsity, H_full: torch.Tensor | None,
                     base: dict) -> list[dict]:
    """Quality rows of magnitude and (given the layer's Hessian) Wanda, which need no timing stages."""
    out = []
    t = time.perf_counter()
    W_mag = solvers.magnitude(W[None], sparsity)[0]
    out.append({**base, "method": "magnitude", "seconds": time.perf_counter() - t,
                "heldout_error": heldout_error(W, layer.heldout, lambda xb: F.linear(xb, W_mag))})
    if H_full is not None:
        t = time.perf_counter()
        W_w = solvers.wanda(W[None], H_full, sparsity)[0]
        out.append({**base, "method": "wanda", "seconds": time.perf_counter() - t,
                    "heldout_error": heldout_error(W, layer.heldout, lambda xb: F.linear(xb, W_w))})
    return out


@torch.no_grad()
def bench_inference(layer: LayerInputs, run: PruneRun, sparsity: Sparsity, cfg: BenchConfig) -> list[dict]:
    """Routed forward (SparseExpertLinear, routing included; 2:4 experts also compressed by its
    to_24) against a dense nn.Linear at each token count."""
    dev, dt = cfg.device, cfg.torch_dtype
    d_out, d_in = layer.weight.shape
    dense = nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dt)
    dense.weight.data.copy_(layer.weight)
    experts = SparseExpertLinear(run.router, run.W_hat.to(dt)).to_dense()
    router = run.router
    experts24 = None
    if sparsity.structured and (sparsity.n, sparsity.m) == (2, 4):
        experts24 = SparseExpertLinear(run.router, run.W_hat.to(dt)).to_24()
    rows = []
    for T in cfg.token_counts:
        reps = math.ceil(T / layer.heldout.shape[0])
        x = layer.heldout.repeat(reps, 1)[:T].to(dt).contiguous()
        r = {"shape": layer.name, "d_in": d_in, "d_out": d_out, "sparsity": str(sparsity),
             "tokens": T, "experts": experts.experts,
             "active_experts": int(torch.unique(router.assign(x)).numel())}
        fns = {"dense_ms": lambda: dense(x), "routing_ms": lambda: router.assign(x),
               "routed_ms": lambda: experts(x)}
        if experts24 is not None:
            fns["routed24_ms"] = lambda: experts24(x)
        r.update({"routed24_ms": None, **time_calls(fns, dev, cfg.bench_budget_s)})
        r["routed_ratio"] = r["routed_ms"] / r["dense_ms"]
        r["routing_share"] = r["routing_ms"] / r["routed_ms"]
        r["routed24_ratio"] = None if experts24 is None else r["routed24_ms"] / r["dense_ms"]
        rows.append(r)
    return rows
