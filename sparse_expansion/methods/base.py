"""The protocol every pruning method follows, and the statistic most of them collect.

A method is a `Method` subclass with a `name`, an `Options` dataclass of its own settings and
three steps the driver calls for each group of linears sharing one input:
  collector(layers, tokens, group)     an object whose `add_batch(x)` sees every input batch of
                                       the group and whose `end_pass()` is called after each pass
                                       over the block's inputs, returning True to ask for another
                                       (`group` names the group in messages);
  prune_group(block, layers, stats, where)
                                       prunes the group in place, returns one LayerReport per linear;
  label()                              how tables name the run.
"""
from __future__ import annotations

import argparse
import time
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from ..errors import flag
from ..kernels.hessian import accumulate_hessian, complete_hessian
from ..kernels.obs import find_quant_grid
from ..models import linear_weight, set_linear_weight
from ..storage.packing import forget_grid, remember_grid
from ..reports import LayerReport
from .. import distributed, solvers


@dataclass
class MethodOptions:
    """A method's own settings. Subclasses add dataclass fields (`metadata={"help": ...}`), which
    become command-line flags, and check their values in `validate` (a UsageError naming the flag)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        pass

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def add_arguments(cls, group, taken: set[str]) -> None:
        """One flag per field not yet in `taken` (methods may share options through inheritance).
        Flags default to absent, so that `from_args` sees which ones the user gave."""
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in taken:
                continue
            taken.add(f.name)
            kind = hints[f.name]
            kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None -> X
            default = "" if f.default is None else f" (default: {f.default})"  # the help says what None means
            group.add_argument(flag(f.name), type=kind, default=argparse.SUPPRESS,
                               help=f"{f.metadata.get('help', '')}{default}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MethodOptions":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


class HessianStats:
    """Running H = 2/n·XᵀX (fp32) of one group's input, batch by batch; one pass suffices.
    Under several ranks each sees its share of the batches and the pass ends with an all-reduce."""

    def __init__(self, columns: int, device):
        self.H = torch.zeros(1, columns, columns, dtype=torch.float32, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)

    def add_batch(self, x: torch.Tensor) -> None:
        accumulate_hessian(self.H, self.count, x.reshape(-1, x.shape[-1]))

    def end_pass(self) -> bool:
        complete_hessian(self.H)
        distributed.all_reduce_mean(self.H, self.count)
        return False


class Method:
    """Base of every method: one Hessian per group (`HessianStats`), then `prune_linear` per
    linear. Subclasses override `prune_linear`, or the whole of `collector`/`prune_group`."""
    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    # under several ranks, each runs its share of the calibration batches (the collector combines
    # the ranks' statistics); False: every rank runs every batch
    shards_calibration: ClassVar[bool] = True

    def __init__(self, config):
        """config: the run's config.PruneConfig (shared settings; `config.options` are this method's)."""
        self.config = config
        self.options = config.options
        self.sparsity = config.sparsity  # the block's own under a layer-wise allocation (the driver sets it)

    def label(self) -> str:
        return self.name

    def collector(self, layers: dict[str, nn.Module], tokens: int, group: str = "layer") -> HessianStats:
        W = linear_weight(next(iter(layers.values())))
        return HessianStats(W.shape[1], W.device)

    def prepare_group(self, stats: HessianStats, group: str) -> None:
        """Work shared by the linears of `group` (e.g. 'block3.mlp.gate_proj/mlp.up_proj', for
        messages) before its first `prune_linear`; none here."""

    def prune_linear(self, W: torch.Tensor, stats: HessianStats) -> tuple[torch.Tensor, dict]:
        """The pruned weight [1, R, C] (fp32) of W [1, R, C], and LayerReport fields to add."""
        raise NotImplementedError

    def prune_group(self, block: nn.Module, layers: dict[str, nn.Module], stats: HessianStats, where: str
                    ) -> list[LayerReport]:
        self.prepare_group(stats, f"{where}.{'/'.join(layers)}")
        reports = []
        for name, module in layers.items():
            t0 = time.perf_counter()
            W = linear_weight(module).detach().float().clone(memory_format=torch.contiguous_format)[None]
            W_hat, fields_ = self.prune_linear(W, stats)
            set_linear_weight(module, W_hat[0])
            if self.config.bits is not None and isinstance(module, nn.Linear):  # the grid every solver rounds
                # on, for the saved integers (compressed-tensors quantizes nn.Linear, not GPT-2's Conv1D)
                grid = find_quant_grid(W, self.config.bits)
                remember_grid(module, grid.scale, grid.zero, self.config.bits)
            else:
                forget_grid(module)  # of an earlier quantized prune
            reports.append(LayerReport(
                layer=f"{where}.{name}", shape=list(W.shape[1:]), tokens=int(stats.count[0]),
                sparsity=float((W_hat == 0).float().mean()),
                relative_error=solvers.relative_error(W, W_hat, stats.H)[0],
                seconds_solve=time.perf_counter() - t0, **fields_))
        return reports


def collect(method: Method, layers: dict[str, nn.Module], batches: list[torch.Tensor]):
    """A group's statistics from its input batches (outside the driver: benchmarks, analysis)."""
    collector = method.collector(layers, sum(xb.reshape(-1, xb.shape[-1]).shape[0] for xb in batches))
    while True:
        for xb in batches:
            collector.add_batch(xb)
        if not collector.end_pass():
            return collector
