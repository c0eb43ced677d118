"""Everything measured on one layer at one sparsity: the pruning runs (library and reference, time
per stage, peak memory, errors), their speed-up rows, the quality table and routed inference."""
from __future__ import annotations

import gc
import traceback

from sparse_expansion.sparsity import Sparsity

from .config import STAGES, BenchConfig
from .evaluate import baseline_quality, bench_inference, run_heldout_error
from .inputs import LayerInputs
from .measure import free, is_oom, peak_mib
from .reference import prune_reference
from .stages import METHODS, PruneRun, calibration_error, prune_library

PIPELINES = {"library": prune_library, "reference": prune_reference}


def prune_row(layer: LayerInputs, sparsity: Sparsity, method: str, impl: str, run: PruneRun, err: float) -> dict:
    d_out, d_in = layer.weight.shape
    return {"shape": layer.name, "d_in": d_in, "d_out": d_out, "sparsity": str(sparsity), "method": method,
            "impl": impl, "clusters": run.W_hat.shape[0],
            "calib_tokens": sum(b.shape[0] for b in layer.calib),
            "heldout_tokens": layer.heldout.shape[0],
            **{f"{s}_s": run.seconds[s] for s in STAGES}, "total_s": run.total_s,
            "peak_extra_mb": run.peak_extra_mb, "peak_total_mb": run.peak_total_mb,
            "heldout_error": err, "calib_error": run.calib_error,
            "cluster_sizes": run.cluster_sizes, "damping_max": max(run.damping) if run.damping else None,
            "kmeans_backend": run.kmeans_backend}


def _ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b


def speedup_row(lib: dict, ref: dict) -> dict:
    """Reference time / library time per stage (None where the stage did not run)."""
    row = {k: lib[k] for k in ("shape", "d_in", "d_out", "sparsity", "method", "clusters")}
    row["impl"] = "speedup"
    for s in STAGES:
        a, b = ref[f"{s}_s"], lib[f"{s}_s"]
        row[f"{s}_s"] = _ratio(a, b) if (a > 0 or b > 0) else None
    row["total_s"] = _ratio(ref["total_s"], lib["total_s"])
    row["peak_extra_mb"] = _ratio(ref["peak_extra_mb"], lib["peak_extra_mb"])
    row["heldout_error"] = _ratio(ref["heldout_error"], lib["heldout_error"])
    return row


def measure_run(W, layer: LayerInputs, sparsity: Sparsity, cfg: BenchConfig, method: str, impl: str
                ) -> tuple[PruneRun, dict]:
    """One pipeline's run with its peak memory, errors and table row. Runs shorter than
    cfg.repeat_below_s are repeated and the fastest kept (its stages all come from that run; the
    memory from the first)."""
    fn = PIPELINES[impl]
    with peak_mib(cfg.device) as mem:
        run = fn(W, layer.calib, sparsity, cfg, method)
    run.peak_extra_mb, run.peak_total_mb = mem["extra_mb"], mem["total_mb"]
    for _ in range(cfg.repeats - 1):
        if run.total_s >= cfg.repeat_below_s:
            break
        again = fn(W, layer.calib, sparsity, cfg, method)
        if again.total_s < run.total_s:
            again.peak_extra_mb, again.peak_total_mb = run.peak_extra_mb, run.peak_total_mb
            run = again
    err = run_heldout_error(W, layer.heldout, run)
    if run.H_c is not None:
        run.calib_error = calibration_error(W, run)
        run.H_c = None
    row = prune_row(layer, sparsity, method, impl, run, err)
    if (method, impl) != ("sparse-expansion", "library"):  # only its experts are used later
        run.W_hat = None
    return run, row


def bench_layer(layer: LayerInputs, sparsity: Sparsity, cfg: BenchConfig, results: dict, step) -> None:
    """Appends the layer's rows to results; step() once per task."""
    sparsity.check_columns(layer.weight.shape[1], layer.name)
    dev = cfg.device
    W = layer.weight.to(dev).float()
    runs, rows, fails = {}, {}, results["failures"]

    def attempt(task, fn):
        try:
            return fn()
        except Exception as e:  # one failure (OOM above all) must not hide the other numbers
            kind = "OOM" if is_oom(e) else type(e).__name__
            fails.append({"shape": layer.name, "sparsity": str(sparsity), "task": task,
                          "error": f"{kind}: {str(e)[:300]}"})
            if not is_oom(e):
                traceback.print_exc()
        finally:
            step(f"{layer.name} {sparsity} {task}")
        gc.collect()  # after the except block: the traceback's frames no longer hold the tensors
        free(dev)
        return None

    for method in METHODS:
        for impl in PIPELINES:
            if impl == "reference" and not cfg.reference:
                continue
            got = attempt(f"{method} {impl}", lambda m=method, i=impl: measure_run(W, layer, sparsity, cfg, m, i))
            if got is not None:
                runs[(method, impl)], rows[(method, impl)] = got
                results["pruning"].append(rows[(method, impl)])
        if (method, "library") in rows and (method, "reference") in rows:
            results["pruning"].append(speedup_row(rows[(method, "library")], rows[(method, "reference")]))

    sg = runs.get(("sparsegpt", "library"))
    se = runs.get(("sparse-expansion", "library"))
    base = {"shape": layer.name, "d_in": W.shape[1], "d_out": W.shape[0], "sparsity": str(sparsity),
            "heldout_tokens": layer.heldout.shape[0]}

    def quality():
        out = baseline_quality(W, layer, sparsity, None if sg is None else sg.H_full, base)
        for (method, impl), run in runs.items():
            out.append({**base, "method": method if impl == "library" else f"{method} (reference)",
                        "seconds": run.total_s, "heldout_error": rows[(method, impl)]["heldout_error"],
                        "calib_error": run.calib_error})
        return out

    results["quality"] += attempt("quality", quality) or []
    if se is not None:
        results["inference"] += attempt("inference", lambda: bench_inference(layer, se, sparsity, cfg)) or []
    else:
        step(f"{layer.name} {sparsity} inference (skipped)")
    runs.clear()
    free(dev)
