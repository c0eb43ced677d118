"""Sequential layer-wise pruning over a model's decoder blocks.

For each block: run the calibration activations through the dense block while each target group
(linears sharing one input) collects statistics of its input, in as many passes as its collector
asks for; prune every group; run the pruned block to produce the next block's inputs. A `Method`
says what a group collects and how it is pruned, so every method shares this loop. A checkpoint,
when given, saves every finished block and the activations after it (see checkpoint.py).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import solvers
from .errors import NumericalError, UsageError
from .kernels.hessian import accumulate_hessian
from .memory import PeakMemory
from .models import (block_output, capture_block_inputs, decoder_blocks, linear_weight, move, set_linear_weight,
                     target_groups)
from .sparsity import Sparsity

METHODS = ("magnitude", "wanda", "sparsegpt", "sparse-expansion")


@dataclass
class PruneConfig:
    method: str = "sparsegpt"
    sparsity: Sparsity = field(default_factory=lambda: Sparsity(0.5))
    bits: int | None = None
    targets: str = "ffn"
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int = 8  # calibration windows per forward pass
    sequential: bool = False  # collect each group's inputs after the block's earlier groups are pruned
    blocks: tuple[int, int] | None = None  # prune only blocks [start, end); all when None
    seed: int = 0
    # sparse-expansion only
    clusters: int = 16
    pca_factor: int = 32
    kmeans_restarts: int = 10
    kmeans_backend: str = "auto"
    small_clusters: str = "shrink"
    shrink_tokens: float = 512.0
    min_cluster_tokens: int = 64
    max_cluster_tokens: int = 262144  # PCA and k-means fit on a seeded sample of at most this many tokens

    def as_dict(self) -> dict:
        d = asdict(self)
        d["sparsity"] = str(self.sparsity)
        return d


class HessianStats:
    """Running H = 2/n·XᵀX (fp32) of one group's input, batch by batch."""

    def __init__(self, columns: int, device):
        self.H = torch.zeros(1, columns, columns, dtype=torch.float32, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)

    def add_batch(self, x: torch.Tensor) -> None:
        accumulate_hessian(self.H, self.count, x.reshape(-1, x.shape[-1]))

    def next_pass(self) -> bool:
        """Whether another pass over the inputs is needed (never: one pass gives H)."""
        return False


def check_method(name: str) -> None:
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def check_block_range(start: int, end: int, count: int) -> None:
    if not 0 <= start < end <= count:
        raise UsageError(f"--blocks {start}:{end}: the model has blocks 0 to {count}; give START:END with "
                         f"0 <= START < END <= {count}")


def check_shapes(model: nn.Module, config: PruneConfig) -> None:
    """Every target linear must suit the sparsity pattern (N:M needs columns divisible by M)."""
    for g in target_groups(model, config.targets):
        for name in g:
            config.sparsity.check_columns(linear_weight(decoder_blocks(model)[0].get_submodule(name)).shape[1], name)


def check_target_shapes(model_ref: str, config: PruneConfig) -> None:
    """check_shapes and the block range on the model's structure built on the meta device."""
    from .models import meta_model
    if config.sparsity.structured or config.blocks:
        model = meta_model(model_ref)
        check_shapes(model, config)
        if config.blocks:
            check_block_range(*config.blocks, len(decoder_blocks(model)))


class Method:
    """Baseline methods: one Hessian per group, then one solver call per linear.

    What the driver asks of a method: `collector(layers, tokens)` gives an object whose
    `add_batch(x)` sees every input batch of the group and whose `next_pass()` says, after each
    pass over the block's inputs, whether it needs another; `prune_group(block, layers,
    collector, where)` then prunes the group in place and returns one report per linear.
    """

    def __init__(self, config: PruneConfig):
        check_method(config.method)
        self.config = config

    def collector(self, layers: dict[str, nn.Module], tokens: int) -> HessianStats:
        first = next(iter(layers.values()))
        W = linear_weight(first)
        return HessianStats(W.shape[1], W.device)

    def prune_group(self, block: nn.Module, layers: dict[str, nn.Module], stats: HessianStats, where: str
                    ) -> list[dict]:
        cfg, H = self.config, stats.H
        factor = None
        if cfg.method == "sparsegpt":  # one factorisation for the whole group
            t0 = time.perf_counter()
            factor = solvers.inverse_hessian_factor(H, cfg.percdamp, f"{where}.{'/'.join(layers)}")
            t_factor = time.perf_counter() - t0
        reports = []
        for name, module in layers.items():
            t0 = time.perf_counter()
            W = linear_weight(module).detach().float().clone(memory_format=torch.contiguous_format)[None]
            info = None
            if cfg.method == "magnitude":
                W_hat = solvers.magnitude(W, cfg.sparsity, cfg.bits)
            elif cfg.method == "wanda":
                W_hat = solvers.wanda(W, H, cfg.sparsity, cfg.bits)
            else:
                W_hat, info = solvers.sparsegpt(W, factor, cfg.sparsity, cfg.bits, cfg.blocksize)
            set_linear_weight(module, W_hat[0])
            report = {"layer": f"{where}.{name}", "shape": list(W.shape[1:]), "tokens": int(stats.count[0]),
                      "sparsity": float((W_hat == 0).float().mean()),
                      "relative_error": solvers.relative_error(W, W_hat, H)[0],
                      "seconds_solve": time.perf_counter() - t0}
            if info is not None:
                report.update(damping=info.damping[0], dead_inputs=info.dead_inputs[0], seconds_factor=t_factor)
            reports.append(report)
        return reports


def make_method(config: PruneConfig):
    if config.method == "sparse-expansion":
        from .expansion import ExpansionMethod
        return ExpansionMethod(config)
    return Method(config)


def check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise NumericalError(f"{where}: activations contain NaN or inf; check the model's weights, dtype and inputs")


def collect(method, layers: dict[str, nn.Module], batches: list[torch.Tensor]):
    """A group's statistics from its input batches (outside the driver: benchmarks, analysis)."""
    collector = method.collector(layers, sum(xb.reshape(-1, xb.shape[-1]).shape[0] for xb in batches))
    while True:
        for xb in batches:
            collector.add_batch(xb)
        if not collector.next_pass():
            return collector


@dataclass
class PruneResult:
    layers: list[dict]   # one report per pruned linear
    blocks: list[dict]   # one entry per decoder block: seconds, peak memory


def _run_block(block: nn.Module, cached: list, device, hooks: dict[nn.Module, Callable] | None = None,
               keep_outputs: bool = False) -> list:
    """Run `block` on every cached input (moved to `device`), with forward-pre-hooks calling
    hooks[module](input); returns the outputs, on the inputs' device, when asked."""
    handles = [m.register_forward_pre_hook(lambda _m, args, f=f: f(args[0])) for m, f in (hooks or {}).items()]
    outputs = []
    try:
        for hidden, args, kwargs in cached:
            out = block_output(block(hidden.to(device), *move(args, device), **move(kwargs, device)))
            if keep_outputs:
                outputs.append((out.to(hidden.device), args, kwargs))
    finally:
        for h in handles:
            h.remove()
    return outputs


def _checked(collector, where: str) -> Callable:
    """collector.add_batch, refusing NaN/inf inputs with the layer named."""
    def add(x: torch.Tensor) -> None:
        check_finite(x, f"{where} input")
        collector.add_batch(x)
    return add


def _prune_block(block: nn.Module, b: int, cached: list, device, phases: list, method) -> list[dict]:
    """Collect each phase's statistics (as many passes over the block's inputs as the method's
    collectors ask for), then prune the phase's groups. Returns the block's layer reports."""
    where, reports = f"block{b}", []
    tokens = sum(hidden.shape[0] * hidden.shape[1] for hidden, _, _ in cached)
    for hidden, _, _ in cached:
        check_finite(hidden, f"{where} input")
    for phase in phases:
        layer_groups = [{name: block.get_submodule(name) for name in g} for g in phase]
        collectors = [method.collector(layers, tokens) for layers in layer_groups]
        pending = list(zip(layer_groups, collectors))
        t_collect = time.perf_counter()
        while pending:
            _run_block(block, cached, device, {next(iter(layers.values())): _checked(c, f"{where}.{'/'.join(layers)}")
                                               for layers, c in pending})
            pending = [(layers, c) for layers, c in pending if c.next_pass()]
        t_collect = time.perf_counter() - t_collect
        for layers, c in zip(layer_groups, collectors):
            reports += [{"block": b, **r, "seconds_collect": t_collect} for r in method.prune_group(block, layers, c, where)]
    return reports


@torch.no_grad()
def prune_model(model: nn.Module, calibration: torch.Tensor, config: PruneConfig, method: Method | None = None,
                progress: bool = True, checkpoint=None, offload_activations: bool = False) -> PruneResult:
    """Prune `model` in place with calibration token ids [N, L].

    Within a block every group's statistics come from the dense block's inputs; the pruned
    block's outputs feed the next block. With a `checkpoint.Checkpoint`, the run resumes after
    its last saved block and saves every block it finishes. `offload_activations` keeps the
    calibration activations (and the blocks' other inputs: masks, position embeddings) on the
    CPU; each batch visits the model's device only while a block runs on it.
    """
    method = method or make_method(config)
    groups = target_groups(model, config.targets)
    check_shapes(model, config)
    # one dense pass collects every group's inputs; --sequential gives each group its own pass
    phases = [[g] for g in groups] if config.sequential else [list(groups)]
    blocks = decoder_blocks(model)
    start, end = config.blocks or (0, len(blocks))
    check_block_range(start, end, len(blocks))
    device = next(model.parameters()).device
    cached = capture_block_inputs(model, list(calibration.split(config.batch_size)),
                                  "cpu" if offload_activations else None)
    result = PruneResult([], [])
    first = 0
    if checkpoint is not None:
        first, cached, result = checkpoint.restore(model, cached, result)
    bar = tqdm(range(first, end), desc=f"prune {config.method}", disable=not progress, unit="block",
               initial=first, total=end)
    for b in bar:
        block = blocks[b]
        with PeakMemory(device) as memory:
            t0 = time.perf_counter()
            reports = _prune_block(block, b, cached, device, phases, method) if b >= start else []
            cached = _run_block(block, cached, device, keep_outputs=True)
        result.layers += reports
        result.blocks.append({"block": b, "pruned": b >= start, "seconds": time.perf_counter() - t0, **memory.peak})
        if checkpoint is not None:
            t0 = time.perf_counter()
            checkpoint.save(b, block, [n for g in groups for n in g] if b >= start else [], cached, result)
            result.blocks[-1]["seconds_checkpoint"] = time.perf_counter() - t0
        if reports:
            bar.set_postfix(err=f"{sum(r['relative_error'] for r in reports) / len(reports):.3g}")
    return result
