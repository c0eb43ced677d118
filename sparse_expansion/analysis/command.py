"""The `analyze` subcommand: its arguments (registered by the CLI), their checks, and running the
experiments."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from .. import checks
from ..data import calibration_windows, check_source, evaluation_windows
from ..errors import UsageError
from ..storage.loading import check_model_ref, load_model, meta_model
from ..sparsity import Sparsity
from .ablation import experiment_ablation
from .clusters import experiment_clusters
from .common import (AnalysisConfig, _kept_positions, analyze_layer, matplotlib_available, resolve_block,
                     resolve_linears)
from .histograms import experiment_histograms
from .neurons import experiment_neurons
from .sweep import experiment_sparsity_sweep

EXPERIMENTS = ("neurons", "histograms", "clusters", "sparsity-sweep", "ablation")


def parse_experiments(text: str) -> tuple[str, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts == ["all"]:
        return EXPERIMENTS
    bad = [p for p in parts if p not in EXPERIMENTS]
    if bad or not parts:
        raise UsageError(f"--experiment {text!r}: use all or a comma-separated list of {', '.join(EXPERIMENTS)}")
    return tuple(dict.fromkeys(parts))


def run_experiments(model: nn.Module, calib_ids: torch.Tensor, eval_ids: torch.Tensor, out: str | Path,
                    experiments: tuple[str, ...] = EXPERIMENTS, config: AnalysisConfig | None = None,
                    ablation_calib_ids: torch.Tensor | None = None, ablation_eval_ids: torch.Tensor | None = None
                    ) -> dict:
    """Run the named experiments on token ids (calibration [N, L], held-out [M, L']) and write their
    files under `out`; the layer experiments share one LayerAnalysis. The ablation uses its own
    ids when given (perplexity windows), else the same ones. Returns {experiment: summary}."""
    cfg = config or AnalysisConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    layer_experiments = [e for e in experiments if e != "ablation"]
    if layer_experiments:
        layer = analyze_layer(model, calib_ids, eval_ids, cfg)
        funcs = {"neurons": experiment_neurons, "histograms": experiment_histograms,
                 "clusters": experiment_clusters, "sparsity-sweep": experiment_sparsity_sweep}
        for e in layer_experiments:
            t0 = time.perf_counter()
            results[e] = funcs[e](layer, out)
            results[e]["seconds"] = time.perf_counter() - t0
    if "ablation" in experiments:
        t0 = time.perf_counter()
        results["ablation"] = experiment_ablation(
            model, calib_ids if ablation_calib_ids is None else ablation_calib_ids,
            eval_ids if ablation_eval_ids is None else ablation_eval_ids, out, cfg)
        results["ablation"]["seconds_total"] = time.perf_counter() - t0
    return results


# ---- command line -----------------------------------------------------------------------------------

def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give comma-separated integers, e.g. 1,2,4,8,16") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"{flag} {text!r}: every value must be at least 1")
    return vals


def check_analyze_args(args) -> tuple[AnalysisConfig, tuple[str, ...]]:
    """Validate `sparse-expansion analyze` arguments before any model is loaded."""
    experiments = parse_experiments(args.experiment)
    rates = {}
    for flag, text in (("--sparsity", args.sparsity), ("--ablation-sparsity", args.ablation_sparsity)):
        s = Sparsity.parse(text)
        if s.structured:
            raise UsageError(f"{flag} {text}: the analysis uses unstructured rates, e.g. 0.9")
        rates[flag] = s.rate
    if not 0 < args.top_percent <= 100:
        raise UsageError(f"--top-percent {args.top_percent}: give a percentage in (0, 100], e.g. 3")
    for value, flag in ((args.nsamples, "--nsamples"), (args.eval_windows, "--eval-windows"),
                        (args.ablation_nsamples, "--ablation-nsamples"),
                        (args.ablation_eval_windows, "--ablation-eval-windows"), (args.pairs, "--pairs"),
                        (args.batch_size, "--batch-size"), (args.clusters, "--clusters"),
                        (args.show, "--show"), (args.random_seeds, "--random-seeds")):
        checks.positive(value, flag)
    if args.skip_first < 0:
        raise UsageError(f"--skip-first {args.skip_first}: must not be negative")
    check_source(args.calib)
    check_model_ref(args.model)
    checks.seqlen(args.model, args.seqlen, "--seqlen")
    checks.seqlen(args.model, args.ablation_seqlen, "--ablation-seqlen")
    _kept_positions(min(args.seqlen, args.ablation_seqlen), args.skip_first)
    checks.device(args.device)
    if not args.no_plots and not matplotlib_available():
        raise UsageError("figures need matplotlib: pip install matplotlib (the 'plots' extra), "
                         "or pass --no-plots for CSV/JSON only")
    linears = tuple(p.strip() for p in args.linears.split(",")) if args.linears else None
    meta = meta_model(args.model)
    cfg = AnalysisConfig(block=resolve_block(meta, args.block), linears=resolve_linears(meta, linears),
                         sparsity=rates["--sparsity"], clusters=args.clusters, pca_factor=args.pca_factor,
                         kmeans_restarts=args.kmeans_restarts, refine_iterations=args.refine_iterations,
                         top_percent=args.top_percent, pairs=args.pairs,
                         show=args.show, cluster_counts=_int_list(args.cluster_counts, "--cluster-counts"),
                         ablation_sparsity=rates["--ablation-sparsity"], ablation_random_seeds=args.random_seeds,
                         skip_first=args.skip_first, batch_size=args.batch_size, seed=args.seed,
                         plots=not args.no_plots, progress=not args.quiet)
    return cfg, experiments


def cmd_analyze(args) -> int:
    """`sparse-expansion analyze MODEL --experiment ... --output DIR`."""
    cfg, experiments = check_analyze_args(args)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, device=checks.device(args.device))
    layer_exps = [e for e in experiments if e != "ablation"]
    calib = held_out = ab_calib = ab_eval = None
    if layer_exps:
        calib = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
        held_out = evaluation_windows(tokenizer, args.calib, args.seqlen, args.eval_windows)
    if "ablation" in experiments:
        ab_calib = calibration_windows(tokenizer, args.calib, args.ablation_nsamples, args.ablation_seqlen, args.seed)
        ab_eval = evaluation_windows(tokenizer, args.calib, args.ablation_seqlen, args.ablation_eval_windows)
    results = run_experiments(model, calib if calib is not None else ab_calib,
                              held_out if held_out is not None else ab_eval, args.out, experiments, cfg,
                              ab_calib, ab_eval)
    seconds = time.perf_counter() - t0
    run = {"command": "analyze", "arguments": vars(args), "config": cfg.as_dict(), "experiments": list(experiments),
           "data": {"calibration": None if calib is None else list(calib.shape),
                    "held_out": None if held_out is None else list(held_out.shape),
                    "ablation_calibration": None if ab_calib is None else list(ab_calib.shape),
                    "ablation_eval": None if ab_eval is None else list(ab_eval.shape)},
           "seconds": seconds, "torch_threads": torch.get_num_threads(),
           "seconds_per_experiment": {e: r.get("seconds", r.get("seconds_total")) for e, r in results.items()}}
    Path(args.out, "run.json").write_text(json.dumps(run, indent=1, default=str) + "\n")
    files = sorted({f for r in results.values() for f in r.get("files", [])})
    print(f"analyzed {args.model} ({', '.join(experiments)}) in {seconds:.1f} s; wrote {len(files) + 1} files "
          f"to {args.out}")
    return 0
