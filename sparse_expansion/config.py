"""`PruneConfig`: what every pruning run shares; a method's own settings sit in `options`."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from .errors import UsageError, option, setting
from .methods import Method, MethodOptions, method_class
from .sparsity import Sparsity, check_bits

TARGETS = ("ffn", "all")
ALLOCATIONS = ("uniform", "owl")


@dataclass
class PruneConfig:
    """method: a registered name (methods.METHODS); sparsity: a `Sparsity`, a rate or "N:M";
    options: the method's `Options`, or a dict of them by name (its defaults when omitted).
    Checked on construction."""
    method: str = "sparsegpt"
    sparsity: Sparsity | str | float = "0.5"
    bits: int | None = None      # joint quantization of the kept weights, 2-8 bits
    targets: str = "ffn"         # ffn, or all (adds the attention projections)
    batch_size: int = 8          # calibration windows per forward pass
    sequential: bool = False     # collect each group's inputs after the block's earlier groups are pruned
    blocks: tuple[int, int] | None = None  # prune only blocks [start, end); all when None
    seed: int = 0
    max_memory: int | None = None  # bytes the solver's working set may use (None: free device memory / no bound)
    allocation: str = "uniform"  # uniform, or owl: per-block rates from outlier ratios (allocation.py)
    owl_m: float = 5.0           # OWL: a score is an outlier above owl_m x the block's mean score
    owl_lambda: float = 0.08     # OWL: block rates lie within +-owl_lambda of the target
    options: MethodOptions | dict | None = field(default=None)

    def __post_init__(self) -> None:
        cls = method_class(self.method)
        if not isinstance(self.sparsity, Sparsity):
            self.sparsity = Sparsity.parse(str(self.sparsity))
        check_bits(self.bits)
        if self.targets not in TARGETS:
            raise UsageError(f"{setting('targets', self.targets)}: use ffn or all")
        if self.batch_size < 1:
            raise UsageError(f"{setting('batch_size', self.batch_size)}: must be at least 1")
        if self.blocks is not None:
            self.blocks = tuple(self.blocks)
        if self.max_memory is not None and self.max_memory < 1:
            raise UsageError(f"{setting('max_memory', self.max_memory)}: give a positive size such as 20GiB")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"{setting('allocation', self.allocation)}: use {' or '.join(ALLOCATIONS)}")
        if self.allocation == "owl":
            if self.sparsity.structured:
                raise UsageError(f"{setting('allocation', 'owl')} gives each block its own rate; "
                                 f"N:M ({self.sparsity}) has one rate")
            if self.owl_m <= 0:
                raise UsageError(f"{setting('owl_m', self.owl_m)}: must be positive (the paper uses 5)")
            limit = min(self.sparsity.rate, 1 - self.sparsity.rate)
            if not (0 <= self.owl_lambda < limit or self.owl_lambda == 0):
                raise UsageError(f"{setting('owl_lambda', self.owl_lambda)}: block rates {self.sparsity.rate:g} +- "
                                 f"lambda must stay inside (0, 1); use 0 <= lambda < {limit:g}")
        if self.options is None:
            self.options = cls.Options()
        elif isinstance(self.options, dict):
            unknown = sorted(set(self.options) - {f.name for f in fields(cls.Options)})
            if unknown:
                raise UsageError(f"{self.method} has no option {', '.join(unknown)}; its options: "
                                 f"{', '.join(f.name for f in fields(cls.Options))}")
            self.options = cls.Options(**self.options)
        elif type(self.options) is not cls.Options:
            raise UsageError(f"{self.method} takes {cls.Options.__name__}, not {type(self.options).__name__}")
        if self.bits is not None and (getattr(self.options, "refine_iterations", 0) or 0) > 0:
            raise UsageError(f"{option('refine_iterations')} re-solves the kept weights off the quantization grid; "
                             f"use {setting('refine_iterations', 0)} with {option('bits')}")

    def make_method(self) -> Method:
        return method_class(self.method)(self)

    def as_dict(self) -> dict:
        return {"method": self.method, "sparsity": str(self.sparsity), "bits": self.bits, "targets": self.targets,
                "batch_size": self.batch_size, "sequential": self.sequential,
                "blocks": None if self.blocks is None else list(self.blocks), "seed": self.seed,
                "max_memory": self.max_memory,
                **({"allocation": self.allocation, "owl_m": self.owl_m, "owl_lambda": self.owl_lambda}
                   if self.allocation != "uniform" else {}),
                "options": self.options.as_dict()}
