"""Orchestration: every layer and sparsity in turn, results saved as they come; `main` is the CLI."""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch
from tqdm.auto import tqdm

from sparse_expansion.sparsity import Sparsity

from . import __doc__ as OVERVIEW
from .config import BenchConfig, config_from_args
from .inputs import smollm2_layers, synthetic_layer
from .layer import bench_layer
from .measure import free, is_oom
from .plots import write_plots
from .report import device_tag, evaluate_targets, format_report, write_csv


def run(cfg: BenchConfig) -> dict:
    """Run the whole benchmark; returns the results dict (also written under cfg.out)."""
    if cfg.gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if cfg.reference and cfg.expansion.small_clusters == "merge":
        raise SystemExit("--small-clusters merge: the reference knows shrink and damping only; add --no-reference")
    sparsities = [Sparsity.parse(s) for s in cfg.sparsities]
    name = torch.cuda.get_device_name(cfg.device) if cfg.gpu else platform.processor() or "cpu"
    results = {"config": {**cfg.as_dict(), "device_name": name, "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "python": platform.python_version(),
                          "kernel_mode": os.environ.get("SPARSE_EXPANSION_KERNELS", "auto"),
                          "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")},
               "pruning": [], "quality": [], "inference": [], "targets": [], "failures": [],
               "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    paths = {}
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        tag = device_tag(cfg)
        paths = {"json": os.path.join(cfg.out, f"layerwise_{tag}.json"),
                 "csv": os.path.join(cfg.out, f"layerwise_{tag}.csv"),
                 "plots": os.path.join(cfg.out, f"layerwise_{tag}")}

    def save():
        results["targets"] = evaluate_targets(results, cfg)
        if paths:
            with open(paths["json"], "w") as f:
                json.dump(results, f, indent=1, default=str)
            write_csv(results, paths["csv"])

    names = ["smollm2 gate", "smollm2 down"] if cfg.inputs == "smollm2" else list(cfg.shapes)
    per_layer = 2 * (2 if cfg.reference else 1) + 2  # pruning runs, quality, inference
    bar = tqdm(total=1 + len(names) * len(sparsities) * per_layer, desc="layerwise", unit="task",
               disable=not cfg.progress, file=sys.stderr)

    def step(what):
        bar.set_postfix_str(what, refresh=False)
        bar.update()

    t_start = time.perf_counter()
    if cfg.inputs == "smollm2":
        layers = smollm2_layers(cfg)
    elif cfg.inputs == "synthetic":
        layers = None
    else:
        raise SystemExit(f"--inputs {cfg.inputs!r}: use synthetic or smollm2")
    step("inputs")
    for i, name_ in enumerate(names):
        try:
            layer = layers[i] if layers is not None else synthetic_layer(cfg, name_, i)
        except Exception as e:
            results["failures"].append({"shape": name_, "sparsity": "", "task": "inputs",
                                        "error": f"{'OOM' if is_oom(e) else type(e).__name__}: {str(e)[:300]}"})
            bar.update(len(sparsities) * per_layer)
            free(cfg.device)
            continue
        for sp in sparsities:
            n_done = bar.n
            try:
                bench_layer(layer, sp, cfg, results, step)
            except Exception as e:  # e.g. an N:M pattern that does not divide the layer's inputs
                results["failures"].append({"shape": layer.name, "sparsity": str(sp), "task": "layer",
                                            "error": f"{type(e).__name__}: {str(e)[:300]}"})
                bar.update(per_layer - (bar.n - n_done))
            save()
        del layer
        if layers is not None:
            layers[i] = None
        free(cfg.device)
    bar.close()
    results["seconds"] = time.perf_counter() - t_start
    save()
    results["paths"] = dict(paths)
    if paths and cfg.plots:
        try:
            results["paths"]["png"] = write_plots(results, paths["plots"])
        except ImportError:
            results["paths"]["png"] = []
            print("# matplotlib is not installed: no plots (pip install matplotlib)")
    return results


def main(argv=None) -> int:
    cfg = config_from_args(argv, OVERVIEW.split("\n\n")[0])
    o = cfg.expansion
    what = (f"SmolLM2 block {cfg.layer} gate_proj/down_proj inputs" if cfg.inputs == "smollm2"
            else f"synthetic inputs, Llama-2 shapes / {cfg.scale}")
    print(f"# layerwise benchmark on {cfg.device} ({torch.cuda.get_device_name(cfg.device) if cfg.gpu else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {what}; {cfg.nsamples}x{cfg.seqlen} "
          f"calibration tokens, {cfg.heldout_tokens} held out; {o.clusters} clusters, k-means restarts "
          f"{o.kmeans_restarts}, small clusters: {o.small_clusters}; sparsity {','.join(cfg.sparsities)}; "
          f"dtype {cfg.dtype}", flush=True)
    if not cfg.gpu:
        print("# CPU: library and reference both run the torch code paths (no Triton); the library's gain "
              "is batching the clusters, not a faster kernel", flush=True)
    results = run(cfg)
    print(format_report(results))
    print(f"# {results['seconds']:.0f} s; wrote " + ", ".join(
        [results["paths"].get("json", ""), results["paths"].get("csv", "")] + results["paths"].get("png", [])))
    return 1 if results["failures"] else 0

