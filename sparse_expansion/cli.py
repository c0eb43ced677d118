"""Command line: `sparse-expansion prune|plan|eval|analyze ...`: the arguments, and `main`,
which runs a subcommand (commands.py) and turns its errors into exit codes.

Every argument is checked before any model is loaded; a bad one prints one line on stderr
naming the fix and exits with code 2, leaving nothing at --output. This module imports no
transformers (and commands.py only once the arguments parse), so that `--help` answers at once.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading

from .config import ALLOCATIONS
from .downstream import PERPLEXITY, WIKI_TASK
from .errors import NumericalError, UsageError, command_line_terms
from .methods import METHODS
from .shapes import PUBLISHED
from .storage.packing import FORMATS
from .version import __version__

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


def _add_analyze_arguments(sub, formatter_class) -> None:
    an = sub.add_parser("analyze", help="neuron analysis: Wasserstein neurons, output distributions, ablation",
                        formatter_class=formatter_class)
    an.add_argument("model", help="model reference as for prune")
    an.add_argument("--experiment", default="all",
                    help="neurons, histograms, clusters, sparsity-sweep, ablation, a comma-separated list, or all")
    an.add_argument("--output", "--out", dest="out", required=True,
                    help="folder for the PNG figures and CSV/JSON tables (--out: the former name)")
    an.add_argument("--block", type=int, default=None, help="decoder block analysed (default: the middle one)")
    an.add_argument("--linears", default=None,
                    help="comma-separated linears sharing one input (default: the first FFN group, e.g. gate/up_proj)")
    an.add_argument("--sparsity", default="0.9", help="rate of the SparseGPT / Sparse Expansion variants")
    an.add_argument("--clusters", type=int, default=16, help="Sparse Expansion experts of the variants")
    an.add_argument("--cluster-counts", default="1,2,4,8,16", help="cluster counts of the clusters experiment")
    an.add_argument("--pca-factor", type=int, default=32, help="routers project to in_features / this before k-means")
    an.add_argument("--kmeans-restarts", type=int, default=10, help="k-means restarts of the routers")
    an.add_argument("--refine-iterations", type=int, default=0,
                    help="re-solve steps on the mask, for the SparseGPT and Sparse Expansion variants alike "
                         "(0: the paper's methods)")
    an.add_argument("--top-percent", type=float, default=3.0, help="Wasserstein neurons: top p%% by W1 to N(0,1)")
    an.add_argument("--pairs", type=int, default=50000, help="token pairs of the mapping difficulty")
    an.add_argument("--show", type=int, default=4, help="neurons per linear in the per-neuron figures")
    an.add_argument("--skip-first", type=int, default=1,
                    help="leading positions of each window left out of the output distributions")
    an.add_argument("--calib", default="wiki", help="source: calibration from its train split, held-out from its test")
    an.add_argument("--nsamples", type=int, default=32, help="calibration windows (Hessians, routers)")
    an.add_argument("--seqlen", type=int, default=256, help="tokens per calibration and held-out window")
    an.add_argument("--eval-windows", type=int, default=32, help="held-out windows giving the output distributions")
    an.add_argument("--ablation-sparsity", default="0.9", help="rate of the ablation's pruned models")
    an.add_argument("--ablation-nsamples", type=int, default=16, help="calibration windows of the ablation")
    an.add_argument("--ablation-seqlen", type=int, default=512, help="tokens per window of the ablation")
    an.add_argument("--ablation-eval-windows", type=int, default=8, help="held-out windows of the perplexities")
    an.add_argument("--random-seeds", type=int, default=1, help="random selections of the ablation")
    an.add_argument("--seed", type=int, default=0, help="draws the windows and seeds the random selections")
    an.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    an.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    an.add_argument("--no-plots", action="store_true", help="CSV/JSON only (figures need matplotlib)")
    an.add_argument("--quiet", action="store_true", help="no progress bars")


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
    ev.add_argument("--experts", default="auto", choices=["auto", "lazy", "saved", "dense"],
                    help="a Sparse Expansion folder's routed experts: lazy (read from their files while their linear "
                         "runs: memory for the dense model and one linear's experts; a read per call, too slow for "
                         "generating), saved (all in memory, compressed), dense (K dense copies in memory: fastest "
                         "on a CPU); auto: lazy for perplexity alone, saved when lm-eval tasks (which may generate) "
                         "run")
    ev.add_argument("--data", default="wiki", help="wiki, sotu, wikitext2, c4, or a .txt file / folder")
    ev.add_argument("--encoding", default="utf-8", help="how a .txt --calib/--data is decoded (e.g. latin-1, cp1252)")
    ev.add_argument("--split", default="auto", choices=["auto", "test", "all"],
                    help="test: the held-out side of the source (1 document in 10 for wiki and files); all: every "
                         "document; auto: test for wiki, sotu, wikitext2 and c4, all for your own file or folder")
    ev.add_argument("--seqlen", type=int, default=2048, help="tokens per perplexity window")
    ev.add_argument("--max-windows", type=int, default=None,
                    help="score at most this many perplexity windows (default: every window of the split)")
    ev.add_argument("--batch-size", type=int, default=None,
                    help="windows (or lm-eval requests) per forward pass (default: lm-eval 4; perplexity as many "
                         "windows as keep a pass's logits under 256 MiB, at most 4)")
    ev.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    ev.add_argument("--onload", default="auto", choices=["auto", "yes", "no"],
                    help="on a GPU, move the model there one decoder block at a time while it runs (yes), whole "
                         "(no), or one block at a time when it would not fit the free memory whole (auto)")
    ev.add_argument("--dtype", default="auto", help="auto (the checkpoint's dtype), bfloat16, float16 or float32")
    ev.add_argument("--json", action="store_true", help="end with one JSON line")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")

    _add_analyze_arguments(sub, defaults)
    return p



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.command_line = shlex.join(["sparse-expansion", *argv])  # for the output's model card
    from transformers.utils import logging as hf_logging

    from . import commands
    bars = hf_logging.is_progress_bar_enabled()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    if getattr(args, "quiet", False):  # transformers' own loading/saving bars too
        hf_logging.disable_progress_bar()
    try:
        with command_line_terms():
            return {"prune": commands.cmd_prune, "plan": commands.cmd_plan, "eval": commands.cmd_eval,
                    "analyze": commands.cmd_analyze}[args.command](args)
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
