"""Sequential layer-wise pruning over a model's decoder blocks.

For each block: run the calibration activations through the dense block while each target group
(linears sharing one input) collects statistics of its input, in as many passes as its collector
asks for; prune every group; run the pruned block to produce the next block's inputs. A
collecting pass stops at the last linear it collects for; the first one keeps the outputs of the
children no target can change (the attention, with FFN targets), which the later passes replay
instead of recomputing (`UnchangedOutputs`); the next block's inputs overwrite this block's.
A `Method` says what a group collects and how it is pruned, so every method shares this loop.
`--allocation owl` gives each block its own rate (allocation.py). A checkpoint, when given,
saves every finished block and the activations after it (see storage/checkpoint.py).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .allocation import block_outlier_ratios, owl_rates
from .storage.checkpoint import Checkpoint
from .config import PruneConfig
from .errors import NumericalError, UsageError, in_command_line, option, setting
from .faults import fault_point
from .memory import PeakMemory, trim_malloc
from .methods import Method
from .models import (block_output, capture_block_inputs, decoder_blocks, is_conv1d, linear_weight, move,
                     move_outside_blocks, target_groups)
from .reports import BlockReport, LayerReport, PruneResult
from .sparsity import Sparsity


def check_block_range(start: int, end: int, count: int) -> None:
    if not 0 <= start < end <= count:
        if in_command_line():
            given, form = f"{start}:{end}", f"START:END with 0 <= START < END <= {count}"
        else:
            given, form = (start, end), f"(start, end) with 0 <= start < end <= {count}"
        raise UsageError(f"{setting('blocks', given)}: the model has blocks 0 to {count}; give {form}")


def check_shapes(model: nn.Module, config: PruneConfig) -> None:
    """Every target linear suits the sparsity pattern (N:M needs columns divisible by M), and the
    block range lies in the model."""
    blocks = decoder_blocks(model)
    for g in target_groups(model, config.targets):
        for name in g:
            config.sparsity.check_columns(linear_weight(blocks[0].get_submodule(name)).shape[1], name)
    if config.blocks:
        check_block_range(*config.blocks, len(blocks))


def check_calibration_tokens(config: PruneConfig, tokens: int) -> None:
    """Enough calibration tokens for the method: k-means needs at least one token per cluster."""
    clusters = getattr(config.options, "clusters", 1)
    if clusters > tokens:
        raise UsageError(f"{setting('clusters', clusters)} with {tokens:,} calibration tokens: at most one cluster per "
                         f"token; lower {option('clusters')} or raise {option('nsamples')} / {option('seqlen')}")


class FiniteCheck:
    """NaN/inf in a stream of activations, checked once at the end rather than per batch (a check
    waits for the GPU): a NaN or inf anywhere makes the running fp32 sum non-finite (as would a
    sum past 3e38), 20x cheaper than isfinite(t).all(), which builds a boolean copy of t."""

    def __init__(self, where: str):
        self.where, self.total = where, None

    def add(self, t: torch.Tensor) -> None:
        s = t.sum(dtype=torch.float32)
        self.total = s if self.total is None else self.total + s

    def check(self) -> None:
        if self.total is not None and not torch.isfinite(self.total):
            raise NumericalError(f"{self.where}: activations contain NaN or inf; check the model's weights, dtype "
                                 f"and inputs")
        self.total = None


class _StopBlock(Exception):
    """Raised by the last collecting hook of a pass: the rest of the block's forward is not needed."""


class UnchangedOutputs:
    """Outputs of a block's children that pruning its targets cannot change, kept from the first
    collecting pass and replayed, instead of recomputed, in the passes after it.

    A child qualifies when it holds weights (a linear) but no target, runs exactly once per batch,
    and runs before any child holding a target: its inputs then depend on nothing pruning changes
    (with FFN targets: the attention of Llama, OPT, GPT-2 and GPT-NeoX blocks). A child whose output
    is larger than the block's input (eager attention returning its probabilities) is recomputed
    rather than kept. The outputs stay where the block's inputs are kept (the CPU when offloaded).
    """

    def __init__(self, block: nn.Module, targets: list[str]):
        holding = {name.split(".")[0] for name in targets}
        self.targets = [child for name, child in block.named_children() if name in holding]
        self.candidates = [child for name, child in block.named_children() if name not in holding
                           and any(isinstance(m, nn.Linear) or is_conv1d(m) for m in child.modules())]
        self.outputs: dict[nn.Module, list] = {}

    @contextmanager
    def recording(self, inputs: list):
        """Keep the candidates' outputs while the block runs once over its `inputs`."""
        recorded = {child: [] for child in self.candidates}
        state = {"reached": False, "store": None, "limit": 0}

        def keep(child, _args, output):
            size = sum(t.numel() for t in _tensors(output))
            if state["reached"] or size > state["limit"]:
                recorded[child].append(None)  # not replayable
            else:
                recorded[child].append(move(output, state["store"]))

        def reach(_child, _args):
            state["reached"] = True
        handles = ([c.register_forward_hook(keep) for c in self.candidates]
                   + [c.register_forward_pre_hook(reach) for c in self.targets])

        def batch(hidden: torch.Tensor) -> None:  # called before each batch runs
            state.update(reached=False, store=hidden.device, limit=hidden.numel())
        try:
            yield batch
        finally:
            for h in handles:
                h.remove()
        self.outputs = {c: outs for c, outs in recorded.items()
                        if len(outs) == len(inputs) and all(o is not None for o in outs)}

    @contextmanager
    def replaying(self, device):
        """The kept children return their recorded outputs, in batch order, while the block runs."""
        saved = {c: c.__dict__.get("forward") for c in self.outputs}
        for child, outs in self.outputs.items():
            replay = iter(outs)
            child.forward = lambda *_a, _r=replay, **_k: move(next(_r), device)
        try:
            yield
        finally:
            for child, forward in saved.items():
                if forward is None:
                    del child.forward
                else:
                    child.forward = forward


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _forward_each(block: nn.Module, inputs: list, device, hooks: dict[nn.Module, Callable], stop_early: bool,
                  on_batch: Callable[[torch.Tensor], None]) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Run `block` on every (hidden, args, kwargs) of `inputs` (moved to `device`), forward-pre-hooks
    calling hooks[module](input); yield (hidden, output). With `stop_early` a batch stops as soon
    as every hooked module has seen its input, and its output is None."""
    seen: set[nn.Module] = set()

    def pre_hook(module, args):
        hooks[module](args[0])
        seen.add(module)
        if stop_early and len(seen) == len(hooks):
            raise _StopBlock
    handles = [m.register_forward_pre_hook(pre_hook) for m in hooks]
    try:
        for hidden, args, kwargs in inputs:
            seen.clear()
            on_batch(hidden)
            try:
                yield hidden, block_output(block(hidden.to(device), *move(args, device), **move(kwargs, device)))
            except _StopBlock:
                yield hidden, None
    finally:
        for h in handles:
            h.remove()


def collect_inputs(block: nn.Module, inputs: list, device, hooks: dict[nn.Module, Callable],
                   unchanged: UnchangedOutputs | None = None, record: bool = False) -> None:
    """A collecting pass: hooks[module](input) for each hooked module of `block` and every batch of
    the block's `inputs`; each batch runs only as far as the last hooked module. `unchanged`: its
    children's outputs are recorded in this pass (`record`: the block's first pass) or replayed."""
    with ExitStack() as stack:
        on_batch = lambda hidden: None  # noqa: E731
        if unchanged is not None and record:
            on_batch = stack.enter_context(unchanged.recording(inputs))
        elif unchanged is not None:
            stack.enter_context(unchanged.replaying(device))
        for _ in _forward_each(block, inputs, device, hooks, True, on_batch):
            pass


def propagate(block: nn.Module, inputs: list, device, hooks: dict[nn.Module, Callable] | None = None,
              unchanged: UnchangedOutputs | None = None) -> list:
    """The propagating pass: `block`'s outputs for every batch of its `inputs`, as the next block's
    inputs (on the inputs' device, written over the spent inputs). `hooks` see their modules'
    inputs on the way; `unchanged` replays its recorded outputs."""
    outputs = []
    with ExitStack() as stack:
        if unchanged is not None:
            stack.enter_context(unchanged.replaying(device))
        for (hidden, args, kwargs), (_, out) in zip(inputs, _forward_each(block, inputs, device, hooks or {}, False,
                                                                            lambda hidden: None)):
            if out.shape == hidden.shape and out.dtype == hidden.dtype and hidden._base is None:
                out = hidden.copy_(out)  # the input is spent: its storage takes the output (one copy, not two)
            outputs.append((out.to(hidden.device), args, kwargs))
    return outputs


def _collect(block: nn.Module, inputs: list, device, groups: dict[nn.Module, tuple], unchanged, **kwargs) -> None:
    """One pass over the block's inputs feeding each group's collector (`groups`: first linear ->
    (collector, name)), refusing NaN/inf inputs, named by layer, after the pass."""
    checks = {first: FiniteCheck(f"{name} input") for first, (_, name) in groups.items()}

    def feed(collector, check):
        def add(x: torch.Tensor) -> None:
            check.add(x)
            collector.add_batch(x)
        return add
    collect_inputs(block, inputs, device, {first: feed(c, checks[first]) for first, (c, _) in groups.items()},
                   unchanged=unchanged, **kwargs)
    for check in checks.values():
        check.check()


def _prune_block(block: nn.Module, b: int, inputs: list, device, phases: list, method: Method,
                 unchanged: UnchangedOutputs, status: Callable[[str], None] = lambda text: None) -> list[LayerReport]:
    """Collect each phase's statistics (one pass over the block's inputs for all its groups, then
    as many more as each group's collector asks for, one group at a time), then prune the phase's
    groups. `status(text)` hears what the block is doing (the progress bar shows it). Returns the
    block's layer reports."""
    where, reports = f"block{b}", []
    tokens = sum(hidden.shape[0] * hidden.shape[1] for hidden, _, _ in inputs)
    check = FiniteCheck(f"{where} input")
    for hidden, _, _ in inputs:
        check.add(hidden)
    check.check()
    for phase in phases:
        layer_groups = [{name: block.get_submodule(name) for name in g} for g in phase]
        names = [f"{where}.{'/'.join(layers)}" for layers in layer_groups]
        collectors = [method.collector(layers, tokens, name) for layers, name in zip(layer_groups, names)]
        t_collect = time.perf_counter()
        status(f"block {b}: collecting")
        _collect(block, inputs, device, {next(iter(layers.values())): (c, name)
                                         for layers, c, name in zip(layer_groups, collectors, names)},
                 unchanged, record=phase is phases[0])
        for layers, c, name in zip(layer_groups, collectors, names):  # further passes: one group at a time,
            passes = 1                                                  # so one group's working set is live
            status(f"{name}: after pass 1")
            while c.end_pass():
                passes += 1
                status(f"{name}: pass {passes}")
                _collect(block, inputs, device, {next(iter(layers.values())): (c, name)}, unchanged)
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
    check_calibration_tokens(config, calibration.numel())
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
    inputs = capture_block_inputs(model, batches[mine], "cpu" if offload_activations else None, device)
    rates = None
    leader = distributed.rank() == 0  # with several ranks, rank 0 alone reports and checkpoints
    if config.allocation == "owl":  # on the dense model, before a checkpoint's pruned blocks are restored;
        # the ratios are over every linear of a block, as OWL's (FFN-only ratios measured worse)
        consumed = capture_block_inputs(model, batches[mine], "cpu" if offload_activations else None, device)
        ratios = block_outlier_ratios(model, consumed, target_groups(model, "all"), config.owl_m, device, propagate,
                                      end, progress and leader)
        rates = dict(zip(range(start, end), owl_rates(ratios[start:], config.sparsity.rate, config.owl_lambda)))
        del consumed
    move_outside_blocks(model, home)
    result, first = PruneResult(), 0
    if checkpoint is not None:
        first, inputs, result = checkpoint.restore(model, inputs, spill, range(len(batches))[mine], len(batches))
    bar = tqdm(range(first, end), desc=f"prune {config.method}", disable=not progress or not leader, unit="block",
               initial=first, total=end)
    for b in bar:
        block = blocks[b]
        with PeakMemory(device) as memory:
            t0 = time.perf_counter()
            block.to(device)
            unchanged = UnchangedOutputs(block, [n for g in groups for n in g]) if b >= start else None
            method.sparsity = Sparsity(rates[b]) if rates and b >= start else config.sparsity
            reports = (_prune_block(block, b, inputs, device, phases, method, unchanged, bar.set_postfix_str)
                       if b >= start else [])
            fault_point(f"pruned:{b}")
            inputs = propagate(block, inputs, device, unchanged=unchanged)
            del unchanged
            block.to(home)
            trim_malloc()  # hand the block's freed working set back to the OS (glibc keeps it otherwise)
        result.layers += reports
        result.blocks.append(BlockReport(b, b >= start, time.perf_counter() - t0, **memory.peak))
        if checkpoint is not None:
            t0 = time.perf_counter()
            hidden = [h for h, _, _ in inputs]
            if method.shards_calibration and distributed.world_size() > 1:  # every rank's share, on rank 0
                hidden = distributed.gather_to_leader(hidden)
            if leader:
                checkpoint.save(b, block, [n for g in groups for n in g] if b >= start else [], hidden, result)
            result.blocks[-1].seconds_checkpoint = time.perf_counter() - t0
        if spill is not None and b >= start:
            spill(b)
        if reports:
            bar.set_postfix(err=f"{sum(r.relative_error for r in reports) / len(reports):.3g}")
    return result
