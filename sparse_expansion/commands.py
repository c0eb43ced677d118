"""The subcommands behind the command line (cli.py parses their arguments): prune, plan, eval
and analyze (analysis/command.py). Each checks its arguments before any model loads and raises
UsageError for a bad one.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from . import checks, distributed
from .analysis.command import cmd_analyze
from .config import PruneConfig
from .data import SOURCES, calibration_windows, check_source, evaluation_windows
from .downstream import PERPLEXITY, prepare_tasks, run_tasks
from .driver import check_calibration_tokens, check_shapes, prune_model
from .errors import UsageError, flag
from .evaluate import perplexity, windows_per_pass
from .memory import available_host_bytes, free_device_bytes, rss_bytes
from .methods import METHODS, ExpansionOptions, method_class
from .methods.expansion.experts import convert_experts
from .methods.expansion.router import choose_backend
from .models import decoder_blocks, family_of, onload_blocks, scoring_bytes
from .plan import Plan, plan_run, planning_dtype, planning_model
from .storage.checkpoint import Checkpoint
from .storage.loading import check_model_ref, load_model, load_tokenizer, meta_model, model_dtype
from .storage.outputs import PartialOutput, check_output, read_metadata, save_pruned_model, spill_block
from .storage.packing import check_format

__all__ = ["cmd_prune", "cmd_plan", "cmd_eval", "cmd_analyze"]


def method_config(args) -> PruneConfig:
    """The run's PruneConfig; a method option given for another method is refused."""
    cls = method_class(args.method)
    own = {f.name for f in fields(cls.Options)}
    for name, other in METHODS.items():
        for f in fields(other.Options):
            if f.name not in own and hasattr(args, f.name):
                raise UsageError(f"{flag(f.name)} is an option of {name}, not of {args.method}; "
                                 f"drop it or add --method {name}")
    return PruneConfig(method=args.method, sparsity=args.sparsity, bits=args.bits, targets=args.targets,
                       batch_size=args.batch_size, sequential=args.sequential, seed=args.seed,
                       blocks=checks.block_range(args.blocks),
                       max_memory=checks.size_bytes(args.max_memory, "--max-memory"),
                       allocation=args.allocation, owl_m=args.owl_m, owl_lambda=args.owl_lambda,
                       options=cls.Options.from_args(args))


def check_prune_args(args) -> PruneConfig:
    checks.kernel_backend()
    config = method_config(args)
    checks.positive(args.nsamples, "--nsamples")
    checks.positive(args.seqlen, "--seqlen")
    check_calibration_tokens(config, args.nsamples * args.seqlen)
    check_output(args.output, args.overwrite)
    check_format(args.format, args.bits, config.method)
    check_source(args.calib, args.encoding)
    check_model_ref(args.model)
    checks.seqlen(args.model, args.seqlen)
    device = checks.device(args.device)
    model_dtype(args.model, args.dtype)
    if isinstance(config.options, ExpansionOptions):
        choose_backend(config.options.kmeans_backend, device)
    if config.sparsity.structured or config.blocks:
        check_shapes(meta_model(args.model), config)
    return config


def device_memory(device: str) -> int | None:
    """The free memory of a CUDA device; on a CPU, the host memory this process may use."""
    if torch.device(device).type == "cuda":
        return free_device_bytes(device)
    available = available_host_bytes()
    return None if available is None else available + (rss_bytes() or 0)


def make_plan(args, config: PruneConfig, device: str, memory: int | None, ranks: int) -> Plan:
    return plan_run(planning_model(args.model), config, args.nsamples, args.seqlen,
                    planning_dtype(args.model, args.dtype), device, memory, ranks, args.offload_activations)


def cmd_plan(args) -> int:
    config = method_config(args)
    checks.positive(args.nsamples, "--nsamples")
    checks.positive(args.ranks, "--ranks")
    check_calibration_tokens(config, args.nsamples * args.seqlen)
    memory = checks.size_bytes(args.device_memory, "--device-memory")
    device = "cuda" if args.device == "auto" and memory is not None else checks.device(args.device)
    if memory is None and torch.device(device).type == "cuda":
        memory = device_memory(device)
    plan = make_plan(args, config, device, memory, args.ranks)
    print(f"plan: {args.model}, {config.make_method().label()} at sparsity {config.sparsity}, "
          f"{args.nsamples} x {args.seqlen} tokens, {args.ranks} rank(s) on {device}")
    print(plan.table())
    disk = disk_shortfalls(args, plan)
    for shortfall in disk:
        print(f"not possible: {shortfall}")
    if args.json:
        print(json.dumps({**plan.to_dict(), "disk": disk}))
    return 1 if plan.fix or disk else 0  # "not possible": a script can test the exit code


def disk_shortfalls(args, plan: Plan) -> list[str]:
    """What the file systems of --output and --checkpoint-dir lack for the plan's sizes."""
    shortfalls = [checks.disk_shortfall(args.output, plan.output_bytes, "the output") if args.output else None,
                  checks.disk_shortfall(args.checkpoint_dir, plan.checkpoint_bytes, "the checkpoint")
                  if args.checkpoint_dir else None]
    return [s for s in shortfalls if s]


def open_checkpoint(args) -> Checkpoint | None:
    """The run's `Checkpoint` (None without --checkpoint-dir), which must lie outside --output."""
    if args.checkpoint_dir is None:
        return None
    folder, output = Path(args.checkpoint_dir).resolve(), Path(args.output).resolve()
    if folder == output or output in folder.parents:
        raise UsageError(f"--checkpoint-dir {args.checkpoint_dir!r} lies in --output {args.output!r}, which is "
                         f"replaced at the end; give a folder outside it")
    return Checkpoint(args.checkpoint_dir, args.model)


def start_run(args) -> tuple[PruneConfig, str, Checkpoint | None, torch.Tensor]:
    """Everything before the model's weights load: the checked config, the device, the
    calibration token ids and the checkpoint, bound to this run (another run's is refused here)."""
    config = check_prune_args(args)
    device = checks.device(args.device)
    distributed.init_from_env(device)  # under torchrun: one process per GPU (or CPU rank)
    device = distributed.local_device(device)
    plan = make_plan(args, config, device, device_memory(device), distributed.world_size())
    shortfalls = [plan.fix] if plan.fix else []  # before any weight loads: memory, then disk
    if distributed.rank() == 0:  # rank 0 writes the output and the checkpoint
        shortfalls += disk_shortfalls(args, plan)
    if plan.invalid:
        raise UsageError(plan.fix)
    if shortfalls and not args.force:
        raise UsageError(f"{shortfalls[0]} (--force runs anyway)")
    for shortfall in shortfalls if distributed.rank() == 0 else []:
        print(f"sparse-expansion: warning: {shortfall}", file=sys.stderr)
    checkpoint = open_checkpoint(args)
    calib = calibration_windows(load_tokenizer(args.model), args.calib, args.nsamples, args.seqlen, args.seed,
                                args.encoding)
    if checkpoint is not None:
        checkpoint.bind(config, calib, device, model_dtype(args.model, args.dtype))
        if distributed.rank() == 0:
            end = (config.blocks or (0, len(decoder_blocks(meta_model(args.model)))))[1]
            print(checkpoint.describe(end), file=sys.stderr)
    return config, device, checkpoint, calib


def cmd_prune(args) -> int:
    t0 = time.perf_counter()
    config, device, checkpoint, calib = start_run(args)
    leader = distributed.rank() == 0  # rank 0 writes the output
    partial = PartialOutput(args.output, args.overwrite) if leader else None  # before the weights load
    try:
        model, tokenizer = load_model(args.model, model_dtype(args.model, args.dtype), "cpu")  # blocks visit `device`
        blocks = family_of(model).blocks
        result = prune_model(model, calib, config, progress=not args.quiet, checkpoint=checkpoint,
                             offload_activations=args.offload_activations, device=device,
                             spill=lambda b: spill_block(model, f"{blocks}.{b}", partial and partial.folder,
                                                         f"experts-{b:05d}.safetensors"))
        seconds = time.perf_counter() - t0
        if not leader:
            distributed.barrier()
            return 0
        metadata = {"command": "prune", "command_line": args.command_line, "arguments": vars(args),
                    "config": config.as_dict(), "seconds": seconds, "world_size": distributed.world_size(),
                    **result.to_dict()}
        out = save_pruned_model(model, tokenizer, args.output, metadata, overwrite=args.overwrite, partial=partial,
                                weight_format=args.format)
    finally:
        if partial is not None:
            partial.discard()
    saved = read_metadata(out)
    print(f"pruned {len(result.layers)} linears of {args.model} with {config.method} at {config.sparsity} "
          f"in {seconds:.1f} s (mean relative error {result.mean_relative_error:.4f}); saved to {out}: "
          f"{saved['saved_bytes'] / 2**20:.1f} MiB of weights, {saved['saved_bytes'] / saved['dense_bytes']:.2f}x "
          f"the dense model's {saved['dense_bytes'] / 2**20:.1f} MiB")
    if checkpoint is not None:
        print(f"checkpoint {checkpoint.folder}: {checkpoint.disk_bytes() / 2**20:.1f} MiB "
              f"({checkpoint.state['activations']['bytes'] / 2**20:.1f} MiB of activations); delete it when done")
    distributed.barrier()
    return 0


def place_for_scoring(model, device: str, onload: str, batch: int | None, seqlen: int) -> None:
    """Move the model to the GPU whole, or (--onload yes, or auto when it would not fit the free
    memory) one decoder block at a time while it runs. `batch` None: perplexity's default."""
    batch = batch or windows_per_pass(model.config.vocab_size, seqlen, next(model.parameters()).element_size())
    need, free = scoring_bytes(model, batch, seqlen), free_device_bytes(device)
    if onload == "yes" or (onload == "auto" and need > free):
        onload_blocks(model, device)
        print(f"the model ({need / 2**30:.1f} GiB to score whole) visits {device} ({free / 2**30:.1f} GiB free) "
              f"one block at a time")
    else:
        model.to(device)


def cmd_eval(args) -> int:
    checks.kernel_backend()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    lm_tasks = [t for t in tasks if t != PERPLEXITY]
    if not tasks:
        raise UsageError("--tasks is empty")
    if PERPLEXITY in tasks:
        check_source(args.data, args.encoding)
        checks.seqlen(args.model, args.seqlen)
    check_model_ref(args.model)
    checks.positive(args.max_windows, "--max-windows")
    checks.positive(args.batch_size, "--batch-size")
    checks.positive(args.limit, "--limit")
    device = checks.device(args.device)
    manager = prepare_tasks(lm_tasks, args.include_path) if lm_tasks else None
    lazy = args.experts == "lazy" or (args.experts == "auto" and not lm_tasks)
    gpu = torch.device(device).type == "cuda"
    model, tokenizer = load_model(args.model, model_dtype(args.model, args.dtype), "cpu" if gpu else device,
                                  lazy=lazy)
    if gpu:
        place_for_scoring(model, device, args.onload, args.batch_size, args.seqlen)
    if args.experts == "dense" and convert_experts(model, "dense"):
        print(f"experts stored dense for this evaluation ({rss_bytes() / 2**30:.1f} GiB resident)")
    result = {"model": args.model}
    if PERPLEXITY in tasks:
        split = args.split if args.split != "auto" else "test" if args.data in SOURCES else "all"
        windows = evaluation_windows(tokenizer, args.data, args.seqlen, args.max_windows, split,
                                     encoding=args.encoding)
        result.update(perplexity(model, windows, args.batch_size, progress=not args.quiet), data=args.data, split=split)
        print(f"perplexity {result['perplexity']:.4f} on {result['tokens']} tokens "
              f"({result['windows']} windows of {result['seqlen']}) of {args.data} ({split} split)")
    if lm_tasks:
        result["tasks"] = run_tasks(model, tokenizer, lm_tasks, manager, args.limit, args.batch_size or 4,
                                    progress=not args.quiet)
        for task, metrics in result["tasks"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples")
            print(f"{task}: {shown}" + (f" ({metrics['examples']} examples)" if metrics["examples"] else ""))
    if args.json:
        print(json.dumps(result))
    return 0
