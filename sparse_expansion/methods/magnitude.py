"""Magnitude pruning: drop the smallest |w| of each matrix (N:M: of each group of M)."""
from __future__ import annotations

import torch

from .. import solvers
from .base import HessianStats, Method


class MagnitudeMethod(Method):
    name = "magnitude"

    def prune_linear(self, W: torch.Tensor, stats: HessianStats) -> tuple[torch.Tensor, dict]:
        return solvers.magnitude(W, self.sparsity, self.config.bits), {}
