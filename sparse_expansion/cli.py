"""Command line: `sparse-expansion prune ...` and `sparse-expansion eval ...`.

Every argument is checked before any model is loaded; a bad one prints one line on stderr
naming the fix and exits with code 2, leaving nothing at --output.
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from . import checks, distributed
from .version import __version__
from .analysis.command import add_analyze_parser, cmd_analyze
from .storage.checkpoint import Checkpoint
from .config import ALLOCATIONS, PruneConfig
from .data import SOURCES, calibration_windows, check_source, evaluation_windows
from .driver import check_calibration_tokens, check_shapes, prune_model
from .errors import NumericalError, UsageError, command_line_terms
from .downstream import PERPLEXITY, WIKI_TASK, prepare_tasks, run_tasks
from .evaluate import perplexity
from .methods.expansion.experts import convert_experts
from .storage.loading import check_model_ref, load_model, load_tokenizer, meta_model, model_dtype
from .memory import available_host_bytes, rss_bytes
from .methods import METHODS, ExpansionOptions, method_class
from .methods.base import flag
from .models import decoder_blocks, family_of
from .plan import PUBLISHED, Plan, plan_run, planning_dtype, planning_model
from .methods.expansion.router import choose_backend
from .storage.packing import FORMATS, check_format
from .storage.outputs import PartialOutput, check_output, read_metadata, save_pruned_model, spill_block

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # as a shell reports a SIGINT
EXIT_TERMINATED = 143  # ... and a SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or torchrun's stop), raised where the run is, so that it unwinds as
    Ctrl-C does: partial outputs removed, the checkpoint kept."""


def _terminate(signum, frame):
    raise Terminated


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, once: not for switches, required options or a
    default of None (the help says what the absence means), nor where the help states it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.required or "default" in text
                or any(action.default is value for value in (None, False, argparse.SUPPRESS))):
            return text
        return f"{text} (default: %(default)s)"


def _add_run_arguments(pr: argparse.ArgumentParser, planning: bool) -> None:
    """The arguments of a prune run; `plan` takes the same (so that a command line can swap one
    word for the other; it writes nothing) and the device to plan for."""
    pr.add_argument("model", help="hub id, local transformers folder, .gguf file, or an embedded model: "
                                  "'smollm2' or 'gemma3'"
                    + (f"; or a published shape: {', '.join(PUBLISHED)}" if planning else ""))
    pr.add_argument("--method", default="sparsegpt", help="magnitude, wanda, sparsegpt or sparse-expansion")
    pr.add_argument("--sparsity", default="0.5", help="unstructured rate in [0, 1) or N:M (N pruned of every M)")
    pr.add_argument("--bits", type=int, default=None,
                    help="joint quantization of kept weights, 2-8 bits (default: none, the weights keep --dtype)")
    pr.add_argument("--calib", default="wiki", help="wiki, sotu, wikitext2, c4, or a .txt file / folder")
    pr.add_argument("--encoding", default="utf-8", help="how a .txt --calib/--data is decoded (e.g. latin-1, cp1252)")
    pr.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    pr.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    pr.add_argument("--seed", type=int, default=0, help="draws the calibration windows (and seeds k-means)")
    pr.add_argument("--targets", default="ffn", help="ffn or all (adds the attention projections)")
    pr.add_argument("--output", required=not planning,
                    help="folder to write the pruned model to" if not planning else
                    "the prune run's output folder: its file system must hold the predicted output "
                    "(default: disk not checked)")
    hidden = argparse.SUPPRESS if planning else None  # prune's flags that plan takes and ignores
    pr.add_argument("--overwrite", action="store_true", help=hidden or "replace an existing --output")
    pr.add_argument("--format", default="auto", choices=FORMATS,
                    help=hidden or "baselines' weights: dense (pruned entries zero, in --dtype) or compressed-tensors "
                                   "integer weights (needs --bits); auto: compressed-tensors when --bits is given")
    pr.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    pr.add_argument("--dtype", default="auto",
                    help="auto (the checkpoint's dtype), bfloat16, float16 or float32: the model, its activations "
                         "and the saved weights (Hessians and solves are fp32)")
    pr.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    pr.add_argument("--blocks", default=None, help="prune only decoder blocks START:END (default: all of them)")
    pr.add_argument("--sequential", action="store_true",
                    help="collect each group's inputs after the block's earlier groups are pruned")
    pr.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                    help="uniform: every block at --sparsity; owl: per-block rates within +-(--owl-lambda) of it, "
                         "more kept where a block has more outlier weights (Yin et al., 2024)")
    pr.add_argument("--owl-m", type=float, default=5.0, help="OWL: outliers score above M x the block's mean")
    pr.add_argument("--owl-lambda", type=float, default=0.08, help="OWL: largest departure from --sparsity")
    pr.add_argument("--quiet", action="store_true", help=hidden or "no progress bars")
    lr = pr.add_argument_group("long runs")
    lr.add_argument("--checkpoint-dir", default=None,
                    help="save every finished block here; re-running the same command resumes after the last one "
                         "(default: no checkpoint)")
    if planning:
        lr.add_argument("--device-memory", default=None,
                        help="memory to plan for, e.g. 24GiB: the GPU's, or the host's RAM with --device cpu "
                             "(default: this machine's free GPU memory; no bound on a CPU)")
        lr.add_argument("--ranks", type=int, default=1,
                        help="processes (one GPU each) the run will use under torchrun")
        lr.add_argument("--json", action="store_true", help="end with the plan as one JSON line")
    lr.add_argument("--max-memory", default=None,
                    help="bytes Sparse Expansion's cluster Hessians and solve may use, e.g. 20GiB: it accumulates and "
                         "solves its experts in chunks of clusters that fit (default: 90%% of the free memory: "
                         "the GPU's, or the host's on a CPU)")
    lr.add_argument("--offload-activations", action="store_true",
                    help="keep the calibration activations on the CPU between blocks (GPU runs)")
    lr.add_argument("--force", action="store_true",
                    help=hidden or "run even when the plan predicts too little memory or disk (its estimates may err)")
    taken: set[str] = set()
    for name, cls in METHODS.items():  # each method's own options, from its Options dataclass
        cls.Options.add_arguments(pr.add_argument_group(f"{name} options"), taken)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-expansion", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    defaults = _HelpFormatter
    pr = sub.add_parser("prune", help="prune a model layer by layer and save it", formatter_class=defaults)
    _add_run_arguments(pr, planning=False)
    pl = sub.add_parser("plan", help="predict a prune run's memory, chunking and sizes from the config alone",
                        formatter_class=defaults)
    _add_run_arguments(pl, planning=True)

    ev = sub.add_parser("eval", help="perplexity on held-out windows and lm-eval tasks", formatter_class=defaults)
    ev.add_argument("model", help="model reference as for prune, or a folder written by prune")
    ev.add_argument("--tasks", default=PERPLEXITY,
                    help=f"comma-separated: {PERPLEXITY} (held-out perplexity of --data) and/or lm-eval tasks, "
                         f"e.g. {WIKI_TASK} (embedded, offline), hellaswag (needs the network)")
    ev.add_argument("--limit", type=int, default=None,
                    help="lm-eval tasks: score the first N documents of each (default: all)")
    ev.add_argument("--include-path", default=None, help="a folder of your own lm-eval task YAML files (default: none)")
    ev.add_argument("--experts", default="saved", choices=["saved", "dense"],
                    help="routed experts as saved (compressed), or dense: faster on a CPU, K dense copies in memory")
    ev.add_argument("--data", default="wiki", help="wiki, sotu, wikitext2, c4, or a .txt file / folder")
    ev.add_argument("--encoding", default="utf-8", help="how a .txt --calib/--data is decoded (e.g. latin-1, cp1252)")
    ev.add_argument("--split", default="auto", choices=["auto", "test", "all"],
                    help="test: the held-out side of the source (1 document in 10 for wiki and files); all: every "
                         "document; auto: test for wiki, sotu, wikitext2 and c4, all for your own file or folder")
    ev.add_argument("--seqlen", type=int, default=2048, help="tokens per perplexity window")
    ev.add_argument("--max-windows", type=int, default=None,
                    help="score at most this many perplexity windows (default: every window of the split)")
    ev.add_argument("--batch-size", type=int, default=4, help="windows (or lm-eval requests) per forward pass")
    ev.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    ev.add_argument("--dtype", default="auto", help="auto (the checkpoint's dtype), bfloat16, float16 or float32")
    ev.add_argument("--json", action="store_true", help="end with one JSON line")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")

    add_analyze_parser(sub, defaults)
    return p


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
        return torch.cuda.mem_get_info(torch.device(device))[0]
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
    model, tokenizer = load_model(args.model, model_dtype(args.model, args.dtype), device)
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
        result["tasks"] = run_tasks(model, tokenizer, lm_tasks, manager, args.limit, args.batch_size,
                                    progress=not args.quiet)
        for task, metrics in result["tasks"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples")
            print(f"{task}: {shown}" + (f" ({metrics['examples']} examples)" if metrics["examples"] else ""))
    if args.json:
        print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.command_line = shlex.join(["sparse-expansion", *argv])  # for the output's model card
    bars = hf_logging.is_progress_bar_enabled()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    if getattr(args, "quiet", False):  # transformers' own loading/saving bars too
        hf_logging.disable_progress_bar()
    try:
        with command_line_terms():
            return {"prune": cmd_prune, "plan": cmd_plan, "eval": cmd_eval, "analyze": cmd_analyze}[args.command](args)
    except UsageError as e:
        print(f"sparse-expansion: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NumericalError as e:
        print(f"sparse-expansion: numerical error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # partial outputs are removed on the way out (PartialOutput.discard)
        resume = "; re-run the same command to resume from the checkpoint" \
            if getattr(args, "checkpoint_dir", None) else ""
        stop = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"sparse-expansion: {stop}{resume}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
