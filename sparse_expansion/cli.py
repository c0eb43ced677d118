"""Command line: `sparse-expansion prune ...` and `sparse-expansion eval ...`.

Every argument is checked before any model is loaded; a bad one prints one line on stderr
naming the fix and exits with code 2, leaving nothing at --output.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .driver import PruneConfig
from .errors import NumericalError, UsageError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-expansion", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prune", help="prune a model layer by layer and save it")
    pr.add_argument("model", help="hub id, local transformers folder, .gguf file, or 'smollm2' (embedded)")
    pr.add_argument("--method", default="sparsegpt", help="magnitude, wanda, sparsegpt or sparse-expansion")
    pr.add_argument("--sparsity", default="0.5", help="unstructured rate in [0, 1) or N:M (N pruned of every M)")
    pr.add_argument("--bits", type=int, default=None, help="joint quantization of kept weights, 2-8 bits")
    pr.add_argument("--calib", default="wiki", help="wiki, wikitext2, c4, or a .txt file / folder")
    pr.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    pr.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--targets", default="ffn", help="ffn (default) or all (adds attention projections)")
    pr.add_argument("--output", required=True, help="folder to write the pruned model to")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    pr.add_argument("--device", default="auto", help="auto, cpu or cuda")
    pr.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    pr.add_argument("--blocks", default=None, help="prune only decoder blocks START:END (default: all)")
    pr.add_argument("--sequential", action="store_true",
                    help="collect each group's inputs after the block's earlier groups are pruned")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    lr = pr.add_argument_group("long runs")
    lr.add_argument("--checkpoint-dir", default=None,
                    help="save every finished block here; re-running the same command resumes after the last one")
    lr.add_argument("--offload-activations", action="store_true",
                    help="keep the calibration activations on the CPU between blocks (GPU runs)")
    se = pr.add_argument_group("sparse-expansion")
    se.add_argument("--clusters", type=int, default=PruneConfig.clusters, help="experts per layer (k-means clusters)")
    se.add_argument("--pca-factor", type=int, default=PruneConfig.pca_factor,
                    help="PCA to input_dim // F components; 0 = no PCA")
    se.add_argument("--kmeans-restarts", type=int, default=PruneConfig.kmeans_restarts)
    se.add_argument("--kmeans-backend", default=PruneConfig.kmeans_backend, help="auto, torch or cuml")
    se.add_argument("--small-clusters", default=PruneConfig.small_clusters,
                    help="damping (paper), shrink (toward the layer Hessian) or merge")
    se.add_argument("--shrink-tokens", type=float, default=PruneConfig.shrink_tokens,
                    help="tau of --small-clusters shrink, in tokens")
    se.add_argument("--min-cluster-tokens", type=int, default=PruneConfig.min_cluster_tokens,
                    help="smallest cluster kept by --small-clusters merge")
    se.add_argument("--max-cluster-tokens", type=int, default=PruneConfig.max_cluster_tokens,
                    help="PCA and k-means fit on a seeded sample of at most this many tokens per layer")

    ev = sub.add_parser("eval", help="perplexity on held-out windows")
    ev.add_argument("model", help="model reference as for prune, or a folder written by prune")
    ev.add_argument("--data", default="wiki", help="wiki, wikitext2, c4, or a .txt file / folder")
    ev.add_argument("--seqlen", type=int, default=2048)
    ev.add_argument("--max-windows", type=int, default=None)
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="end with one JSON line")
    ev.add_argument("--quiet", action="store_true")

    an = sub.add_parser("analyze", help="neuron analysis: Wasserstein neurons, output distributions, ablation")
    an.add_argument("model", help="model reference as for prune")
    an.add_argument("--experiment", default="all",
                    help="neurons, histograms, clusters, sparsity-sweep, ablation, a comma-separated list, or all")
    an.add_argument("--out", required=True, help="folder for the PNG figures and CSV/JSON tables")
    an.add_argument("--block", type=int, default=None, help="decoder block analysed (default: the middle one)")
    an.add_argument("--linears", default=None,
                    help="comma-separated linears sharing one input (default: the first FFN group, e.g. gate/up_proj)")
    an.add_argument("--sparsity", default="0.9", help="rate of the SparseGPT / Sparse Expansion variants")
    an.add_argument("--clusters", type=int, default=16, help="Sparse Expansion experts of the variants")
    an.add_argument("--cluster-counts", default="1,2,4,8,16", help="cluster counts of the clusters experiment")
    an.add_argument("--pca-factor", type=int, default=32)
    an.add_argument("--kmeans-restarts", type=int, default=10)
    an.add_argument("--top-percent", type=float, default=3.0, help="Wasserstein neurons: top p%% by W1 to N(0,1)")
    an.add_argument("--pairs", type=int, default=50000, help="token pairs of the mapping difficulty")
    an.add_argument("--show", type=int, default=4, help="neurons per linear in the per-neuron figures")
    an.add_argument("--skip-first", type=int, default=1,
                    help="leading positions of each window left out of the output distributions")
    an.add_argument("--calib", default="wiki", help="source: calibration from its train split, held-out from its test")
    an.add_argument("--nsamples", type=int, default=32, help="calibration windows (Hessians, routers)")
    an.add_argument("--seqlen", type=int, default=256)
    an.add_argument("--eval-windows", type=int, default=32, help="held-out windows giving the output distributions")
    an.add_argument("--ablation-sparsity", default="0.9")
    an.add_argument("--ablation-nsamples", type=int, default=16)
    an.add_argument("--ablation-seqlen", type=int, default=512)
    an.add_argument("--ablation-eval-windows", type=int, default=8, help="held-out windows of the perplexities")
    an.add_argument("--random-seeds", type=int, default=1, help="random selections of the ablation")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--batch-size", type=int, default=8)
    an.add_argument("--device", default="auto")
    an.add_argument("--no-plots", action="store_true", help="CSV/JSON only (figures need matplotlib)")
    an.add_argument("--quiet", action="store_true")
    return p


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"--device {name!r}: use auto, cpu or cuda")
    return name


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} {value}: must be at least 1")


def _check_seqlen(model: str, seqlen: int) -> None:
    from .models import model_context
    _positive(seqlen, "--seqlen")
    context = model_context(model)
    if context is not None and seqlen > context:
        raise UsageError(f"--seqlen {seqlen} exceeds the model's context of {context} tokens; use --seqlen {context} or less")


def _block_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        start, end = (int(p) for p in text.split(":"))
    except ValueError:
        raise UsageError(f"--blocks {text!r}: write START:END, e.g. 0:8") from None
    return start, end


def check_prune_args(args) -> PruneConfig:
    from .data import check_source
    from .driver import check_method, check_target_shapes, make_method
    from .router import choose_backend
    from .models import check_model_ref
    from .save import check_output
    from .sparsity import Sparsity, check_bits

    sparsity = Sparsity.parse(args.sparsity)
    check_bits(args.bits)
    check_method(args.method)
    if args.targets not in ("ffn", "all"):
        raise UsageError(f"--targets {args.targets!r}: use ffn or all")
    _positive(args.nsamples, "--nsamples")
    _positive(args.batch_size, "--batch-size")
    check_output(args.output, args.overwrite)
    check_source(args.calib)
    check_model_ref(args.model)
    _check_seqlen(args.model, args.seqlen)
    _positive(args.kmeans_restarts, "--kmeans-restarts")
    _positive(args.max_cluster_tokens, "--max-cluster-tokens")
    if args.shrink_tokens < 0 or args.min_cluster_tokens < 0:
        raise UsageError("--shrink-tokens and --min-cluster-tokens must not be negative")
    config = PruneConfig(method=args.method, sparsity=sparsity, bits=args.bits, targets=args.targets,
                         batch_size=args.batch_size, sequential=args.sequential, seed=args.seed,
                         blocks=_block_range(args.blocks),
                         clusters=args.clusters, pca_factor=args.pca_factor, kmeans_restarts=args.kmeans_restarts,
                         kmeans_backend=args.kmeans_backend, small_clusters=args.small_clusters,
                         shrink_tokens=args.shrink_tokens, min_cluster_tokens=args.min_cluster_tokens,
                         max_cluster_tokens=args.max_cluster_tokens)
    make_method(config)  # validates the method's own options
    if config.method == "sparse-expansion":
        choose_backend(config.kmeans_backend, _device(args.device))
    check_target_shapes(args.model, config)
    return config


def open_checkpoint(args, config: PruneConfig, device: str):
    """The run's `Checkpoint` (None without --checkpoint-dir); refuses one made with other arguments."""
    if args.checkpoint_dir is None:
        return None
    from pathlib import Path
    from .checkpoint import Checkpoint
    folder, output = Path(args.checkpoint_dir).resolve(), Path(args.output).resolve()
    if folder == output or output in folder.parents:
        raise UsageError(f"--checkpoint-dir {args.checkpoint_dir!r} lies in --output {args.output!r}, which is "
                         f"replaced at the end; give a folder outside it")
    from . import __version__
    identity = {"version": __version__, "model": args.model, "calib": args.calib, "nsamples": args.nsamples,
                "seqlen": args.seqlen, "device": torch.device(device).type, **config.as_dict()}
    return Checkpoint(args.checkpoint_dir, identity)


def cmd_prune(args) -> int:
    config = check_prune_args(args)
    device = _device(args.device)
    checkpoint = open_checkpoint(args, config, device)
    from .data import calibration_windows
    from .driver import prune_model
    from .models import load_model
    from .save import read_metadata, save_pruned_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, device=device)
    calib = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
    if checkpoint is not None:
        print(checkpoint.describe(), file=sys.stderr)
    result = prune_model(model, calib, config, progress=not args.quiet, checkpoint=checkpoint,
                         offload_activations=args.offload_activations)
    reports = result.layers
    seconds = time.perf_counter() - t0
    metadata = {"command": "prune", "arguments": vars(args), "config": config.as_dict(),
                "seconds": seconds, "layers": reports, "blocks": result.blocks}
    out = save_pruned_model(model, tokenizer, args.output, metadata, overwrite=args.overwrite)
    saved = read_metadata(out)
    mean_err = sum(r["relative_error"] for r in reports) / max(len(reports), 1)
    print(f"pruned {len(reports)} linears of {args.model} with {config.method} at {config.sparsity} "
          f"in {seconds:.1f} s (mean relative error {mean_err:.4f}); saved to {out}: "
          f"{saved['saved_bytes'] / 2**20:.1f} MiB of weights, {saved['saved_bytes'] / saved['dense_bytes']:.2f}x "
          f"the dense model's {saved['dense_bytes'] / 2**20:.1f} MiB")
    if checkpoint is not None:
        print(f"checkpoint {checkpoint.folder}: {checkpoint.disk_bytes() / 2**20:.1f} MiB "
              f"({checkpoint.state['activations']['bytes'] / 2**20:.1f} MiB of activations); delete it when done")
    return 0


def cmd_eval(args) -> int:
    from .data import check_source, evaluation_windows
    from .evaluate import perplexity
    from .models import check_model_ref, load_model

    check_source(args.data)
    check_model_ref(args.model)
    _check_seqlen(args.model, args.seqlen)
    _positive(args.max_windows, "--max-windows")
    _positive(args.batch_size, "--batch-size")
    device = _device(args.device)
    model, tokenizer = load_model(args.model, device=device)
    windows = evaluation_windows(tokenizer, args.data, args.seqlen, args.max_windows)
    result = perplexity(model, windows, args.batch_size, progress=not args.quiet)
    result.update(model=args.model, data=args.data)
    print(f"perplexity {result['perplexity']:.4f} on {result['tokens']} tokens "
          f"({result['windows']} windows of {result['seqlen']}) of {args.data}")
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_analyze(args) -> int:
    from .analysis import cmd_analyze as run_analysis  # imported only when used
    return run_analysis(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"prune": cmd_prune, "eval": cmd_eval, "analyze": cmd_analyze}[args.command](args)
    except UsageError as e:
        print(f"sparse-expansion: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NumericalError as e:
        print(f"sparse-expansion: numerical error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
