"""Wanda (Sun et al., 2024): score |w_ij|·‖x_j‖₂, compared within each output row."""
from __future__ import annotations

import torch

from .. import solvers
from .base import HessianStats, Method


class WandaMethod(Method):
    name = "wanda"

    def prune_linear(self, W: torch.Tensor, stats: HessianStats) -> tuple[torch.Tensor, dict]:
        return solvers.wanda(W, stats.H, self.sparsity, self.config.bits), {}
