"""Layer-wise sparsity allocation: OWL (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity").

Before pruning, one dense pass over the calibration inputs gives the input column norms ‖x_j‖
of every linear of every block (attention included, as OWL defines a layer's ratio, whatever
the run prunes). A block's outlier ratio is the fraction of its linears' Wanda scores
|w_ij|·‖x_j‖ above `m` times their mean. Ratios are scaled to [0, 2λ]; a block's density is its
scaled ratio minus the mean scaled ratio plus (1 − rate): blocks with more outliers keep more
weights, every rate lies within ±λ of the target, and their mean is the target (every block's
targets have the same shapes in the supported families, so the overall rate is the target too).
The paper's defaults: m = 5, λ = 0.08.

Measured on SmolLM2-135M (FFN targets, reference protocol; benchmarks/results/quality.json):
OWL helps SparseGPT at 70% and costs a little at 50%, as the paper found for LLaMA; ratios over
the FFN linears alone hurt at both rates. The pre-pass costs one dense forward of the model.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .models import decoder_blocks, linear_weight


class ColumnNorms:
    """Mean of x_j² over one group's input rows, per column (all-reduced over ranks)."""

    def __init__(self, columns: int, device):
        self.sq = torch.zeros(1, 1, columns, dtype=torch.float32, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = int(self.count[0])
        self.sq[0, 0].mul_(n / (n + x.shape[0])).add_(x.square().sum(0), alpha=1 / (n + x.shape[0]))
        self.count += x.shape[0]

    def norms(self) -> torch.Tensor:
        distributed.all_reduce_mean(self.sq, self.count)
        return self.sq[0, 0].sqrt()


def outlier_ratio(weights: list[torch.Tensor], norms: list[torch.Tensor], m: float) -> float:
    """Fraction of the Wanda scores |w_ij|·‖x_j‖ of all `weights` [R, C] (each with its inputs'
    norms [C]) above `m` times their mean."""
    scores = torch.cat([(W.float().abs() * n[None, :].to(W.device)).flatten() for W, n in zip(weights, norms)])
    return float((scores > m * scores.mean()).float().mean())


def owl_rates(ratios: list[float], rate: float, lam: float) -> list[float]:
    """Per-block sparsity from the blocks' outlier ratios (see the module's docstring)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1 - rate)
    return (1 - density).tolist()


@torch.no_grad()
def block_outlier_ratios(model: nn.Module, inputs: list, groups, m: float, device, propagate, end: int,
                         progress: bool = True) -> list[float]:
    """The outlier ratios of blocks 0 to end - 1 of the dense model, the calibration inputs
    `inputs` (the first block's, consumed: each block's outputs are written over them) run through
    them. `propagate` is the driver's (block, inputs, device, hooks)."""
    ratios = []
    home = next(model.parameters()).device
    for block in tqdm(decoder_blocks(model)[:end], desc="OWL outlier ratios", unit="block", disable=not progress):
        block.to(device)
        layers = [[block.get_submodule(name) for name in g] for g in groups]
        stats = [ColumnNorms(linear_weight(g[0]).shape[1], device) for g in layers]
        inputs = propagate(block, inputs, device, {g[0]: s.add_batch for g, s in zip(layers, stats)})
        norms = [s.norms() for s in stats]
        ratios.append(outlier_ratio([linear_weight(lin) for g in layers for lin in g],
                                    [n for g, n in zip(layers, norms) for _ in g], m))
        block.to(home)
    return ratios
