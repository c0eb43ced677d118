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

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import Checkpoint
from .config import PruneConfig
from .errors import NumericalError, UsageError
from .faults import fault_point
from .memory import PeakMemory, trim_malloc
from .methods import Method
from .models import (block_output, capture_block_inputs, decoder_blocks, linear_weight, move, move_outside_blocks,
                     target_groups)
from .reports import BlockReport, LayerReport, PruneResult


def check_block_range(start: int, end: int, count: int) -> None:
    if not 0 <= start < end <= count:
        raise UsageError(f"--blocks {start}:{end}: the model has blocks 0 to {count}; give START:END with "
                         f"0 <= START < END <= {count}")


def check_shapes(model: nn.Module, config: PruneConfig) -> None:
    """Every target linear suits the sparsity pattern (N:M needs columns divisible by M), and the
    block range lies in the model."""
    blocks = decoder_blocks(model)
    for g in target_groups(model, config.targets):
        for name in g:
            config.sparsity.check_columns(linear_weight(blocks[0].get_submodule(name)).shape[1], name)
    if config.blocks:
        check_block_range(*config.blocks, len(blocks))


def check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise NumericalError(f"{where}: activations contain NaN or inf; check the model's weights, dtype and inputs")


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


def _prune_block(block: nn.Module, b: int, cached: list, device, phases: list, method: Method,
                 status: Callable[[str], None] = lambda text: None) -> list[LayerReport]:
    """Collect each phase's statistics (one pass over the block's inputs for all its groups, then
    as many more as each group's collector asks for, one group at a time), then prune the phase's
    groups. `status(text)` hears what the block is doing (the progress bar shows it). Returns the
    block's layer reports."""
    where, reports = f"block{b}", []
    tokens = sum(hidden.shape[0] * hidden.shape[1] for hidden, _, _ in cached)
    for hidden, _, _ in cached:
        check_finite(hidden, f"{where} input")
    for phase in phases:
        layer_groups = [{name: block.get_submodule(name) for name in g} for g in phase]
        names = [f"{where}.{'/'.join(layers)}" for layers in layer_groups]
        collectors = [method.collector(layers, tokens, name) for layers, name in zip(layer_groups, names)]
        t_collect = time.perf_counter()
        status(f"block {b}: collecting")
        _run_block(block, cached, device, {next(iter(layers.values())): _checked(c, name)
                                           for layers, c, name in zip(layer_groups, collectors, names)})
        for layers, c, name in zip(layer_groups, collectors, names):  # further passes: one group at a time,
            passes = 1                                                  # so one group's working set is live
            status(f"{name}: after pass 1")
            while c.end_pass():
                passes += 1
                status(f"{name}: pass {passes}")
                _run_block(block, cached, device, {next(iter(layers.values())): _checked(c, name)})
                status(f"{name}: after pass {passes}")
        t_collect = time.perf_counter() - t_collect
        for layers, c, name in zip(layer_groups, collectors, names):
            status(f"{name}: pruning")
            for report in method.prune_group(block, layers, c, where):
                report.block, report.seconds_collect = b, t_collect
                reports.append(report)
    return reports


@torch.no_grad()
def prune_model(model: nn.Module, calibration: torch.Tensor, config: PruneConfig, method: Method | None = None,
                progress: bool = True, checkpoint: Checkpoint | None = None, offload_activations: bool = False,
                device=None, spill: Callable[[int], None] | None = None) -> PruneResult:
    """Prune `model` in place with calibration token ids [N, L].

    Within a block every group's statistics come from the dense block's inputs; the pruned
    block's outputs feed the next block. With a `Checkpoint`, the run resumes after its last saved
    block (once the checkpoint's identity, from `config`, the calibration tokens and the device,
    matches this run's) and saves every block it finishes.

    `device` (e.g. "cuda"): the model's weights stay where they are (the CPU) and each decoder
    block visits `device` only while it is calibrated, pruned and run (sequential onloading: the
    device holds one block, its activations and the solver's working set, never the model).
    None: everything runs where the model is. `offload_activations` keeps the calibration
    activations (and the blocks' other inputs: masks, position embeddings) on the CPU; each batch
    visits the device only while a block runs on it. `spill(b)`, when given, is called once block
    b is pruned (and checkpointed) or restored: prune passes outputs.spill_block, which writes the
    block's experts to the output and releases them, so that the host holds one block's experts.
    """
    method = method or config.make_method()
    groups = target_groups(model, config.targets)
    check_shapes(model, config)
    # one dense pass collects every group's inputs; --sequential gives each group its own pass
    phases = [[g] for g in groups] if config.sequential else [list(groups)]
    blocks = decoder_blocks(model)
    start, end = config.blocks or (0, len(blocks))
    home = next(model.parameters()).device
    device = home if device is None else torch.device(device)
    if checkpoint is not None:
        checkpoint.bind(config, calibration, device, next(blocks[0].parameters()).dtype)
    batches = list(calibration.split(config.batch_size))
    # under several ranks a method that shards the calibration runs its share of the batches
    mine = distributed.my_share(len(batches)) if method.shards_calibration else slice(0, len(batches))
    move_outside_blocks(model, device)
    cached = capture_block_inputs(model, batches[mine], "cpu" if offload_activations else None, device)
    move_outside_blocks(model, home)
    result, first = PruneResult(), 0
    if checkpoint is not None:
        first, cached, result = checkpoint.restore(model, cached, spill, range(len(batches))[mine], len(batches))
    leader = distributed.rank() == 0  # with several ranks, rank 0 alone reports and checkpoints
    bar = tqdm(range(first, end), desc=f"prune {config.method}", disable=not progress or not leader, unit="block",
               initial=first, total=end)
    for b in bar:
        block = blocks[b]
        with PeakMemory(device) as memory:
            t0 = time.perf_counter()
            block.to(device)
            reports = (_prune_block(block, b, cached, device, phases, method, bar.set_postfix_str)
                       if b >= start else [])
            fault_point(f"pruned:{b}")
            cached = _run_block(block, cached, device, keep_outputs=True)
            block.to(home)
            trim_malloc()  # hand the block's freed working set back to the OS (glibc keeps it otherwise)
        result.layers += reports
        result.blocks.append(BlockReport(b, b >= start, time.perf_counter() - t0, **memory.peak))
        if checkpoint is not None:
            t0 = time.perf_counter()
            hidden = [h for h, _, _ in cached]
            if method.shards_calibration and distributed.world_size() > 1:  # every rank's share, on rank 0
                hidden = distributed.gather_to_leader([h.cpu() for h in hidden])
            if leader:
                checkpoint.save(b, block, [n for g in groups for n in g] if b >= start else [], hidden, result)
            result.blocks[-1].seconds_checkpoint = time.perf_counter() - t0
        if spill is not None and b >= start:
            spill(b)
        if reports:
            bar.set_postfix(err=f"{sum(r.relative_error for r in reports) / len(reports):.3g}")
    return result
