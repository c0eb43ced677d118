"""What a pruning run reports: one `LayerReport` per pruned linear, one `BlockReport` per decoder
block, gathered in a `PruneResult`; their JSON form is written and read here only."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class LayerReport:
    """One pruned linear. `relative_error` = ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs (from
    the Hessian); `damping` and `dead_inputs` hold one entry per solved matrix (one per expert for
    Sparse Expansion, absent for solvers without a Hessian factor); `extras` is the method's own.
    `seconds_collect` is the block's passes over its inputs (for Sparse Expansion it includes the
    router fit and the chunked solves, also reported as seconds_router and seconds_solve; its
    seconds_refine is the part of seconds_solve spent re-solving the experts on their masks)."""
    layer: str
    shape: list[int]
    tokens: int
    sparsity: float
    relative_error: float
    seconds_solve: float
    block: int | None = None
    seconds_collect: float = 0.0
    damping: list[float] | None = None
    dead_inputs: list[int] | None = None
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extras"}
        return {**d, **self.extras}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerReport":
        names = {f.name for f in fields(cls)} - {"extras"}
        return cls(**{k: v for k, v in d.items() if k in names}, extras={k: v for k, v in d.items() if k not in names})


@dataclass
class BlockReport:
    """One decoder block: wall time (collect + prune + propagate), peak memory, checkpoint time."""
    block: int
    pruned: bool
    seconds: float
    peak_rss_bytes: int | None = None
    peak_cuda_bytes: int | None = None
    seconds_checkpoint: float | None = None


@dataclass
class PruneResult:
    layers: list[LayerReport] = field(default_factory=list)
    blocks: list[BlockReport] = field(default_factory=list)
    config: dict | None = None  # the run's PruneConfig.as_dict(), where the caller records it

    @property
    def mean_relative_error(self) -> float:
        return sum(r.relative_error for r in self.layers) / max(len(self.layers), 1)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned linears (weighted by their size)."""
        sizes = [r.shape[0] * r.shape[1] for r in self.layers]
        return sum(r.sparsity * s for r, s in zip(self.layers, sizes)) / max(sum(sizes), 1)

    def to_dict(self) -> dict:
        return {"layers": [r.to_dict() for r in self.layers], "blocks": [asdict(b) for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict) -> "PruneResult":
        return cls([LayerReport.from_dict(r) for r in d["layers"]], [BlockReport(**b) for b in d["blocks"]])
