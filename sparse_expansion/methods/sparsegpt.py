"""SparseGPT (Frantar & Alistarh, 2023): OBS column updates with a shared inverse-Hessian factor."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import distributed, solvers
from ..errors import UsageError, setting
from .base import HessianStats, Method, MethodOptions


REFINE_STEPS = 5  # refine_iterations=None: layer study, 5 steps give ~92% of 60 steps' error reduction


@dataclass
class SparseGPTOptions(MethodOptions):
    blocksize: int = field(default=128, metadata={"help": "columns per lazy OBS block"})
    percdamp: float = field(default=0.01, metadata={"help": "Hessian damping, fraction of its mean diagonal"})
    refine_iterations: int | None = field(default=0, metadata={
        "help": "after SparseGPT, re-solve the kept weights on its mask by this many conjugate-gradient steps "
                "on its own objective (solvers.refine_on_mask); sparsegpt: 0, the published algorithm; "
                "sparse-expansion: 5, or 0 with --bits"})

    def validate(self) -> None:
        if self.blocksize < 1:
            raise UsageError(f"{setting('blocksize', self.blocksize)}: must be at least 1")
        if not 0 < self.percdamp < 1:
            raise UsageError(f"{setting('percdamp', self.percdamp)}: use a fraction in (0, 1), e.g. 0.01")
        if (self.refine_iterations or 0) < 0:
            raise UsageError(f"{setting('refine_iterations', self.refine_iterations)}: must not be negative")

    def refine_steps(self, bits: int | None) -> int:
        """The conjugate-gradient steps a run takes: refine_iterations, or (None) REFINE_STEPS
        without --bits and 0 with it (the re-solve moves kept weights off the quantization grid)."""
        if self.refine_iterations is not None:
            return self.refine_iterations
        return 0 if bits is not None else REFINE_STEPS


class SparseGPTMethod(Method):
    name = "sparsegpt"
    Options = SparseGPTOptions

    def prepare_group(self, stats: HessianStats, group: str) -> None:
        t0 = time.perf_counter()  # one factorisation for the whole group
        self.factor = solvers.inverse_hessian_factor(stats.H, self.options.percdamp, group, in_place=True)
        self.seconds_factor = time.perf_counter() - t0

    def prune_linear(self, W: torch.Tensor, stats: HessianStats) -> tuple[torch.Tensor, dict]:
        """Under several ranks each solves its share of the rows (they share the factor) and the
        rows are gathered; the masks are chosen over every rank's rows."""
        cfg, rows = self.config, W.shape[1]
        W_hat, info = solvers.sparsegpt(W[:, distributed.my_share(rows)], self.factor, self.sparsity, cfg.bits,
                                        self.options.blocksize, select=distributed.row_selector(rows))
        if steps := self.options.refine_steps(cfg.bits):
            solvers.refine_on_mask(W[:, distributed.my_share(rows)], W_hat, stats.H, info.damping, steps)
        W_hat = distributed.gather_rows(W_hat, rows)
        return W_hat, {"damping": info.damping, "dead_inputs": info.dead_inputs,
                       "extras": {"seconds_factor": self.seconds_factor}}
