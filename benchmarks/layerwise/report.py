"""Results out: targets, text tables, the CSV file and the device tag in file names."""
from __future__ import annotations

import csv
import re

import torch

from .config import BenchConfig

SAME_ERROR_TOL = 0.02  # "same reconstruction error": library error <= reference error x 1.02


def evaluate_targets(results: dict, cfg: BenchConfig) -> list[dict]:
    """Pass/fail rows of the targets (module docstring of benchmarks.layerwise); never asserted."""
    rows = []
    by = {(r["shape"], r["sparsity"], r["method"], r["impl"]): r for r in results["pruning"]}
    for (shape, sp, method, impl), lib in by.items():
        if method != "sparse-expansion" or impl != "library":
            continue
        ref = by.get((shape, sp, method, "reference"))
        if ref is not None:
            speed = ref["total_s"] / lib["total_s"]
            same = lib["heldout_error"] <= ref["heldout_error"] * (1 + SAME_ERROR_TOL)
            rows.append({"target": f"SE {lib['clusters']} clusters >= 2x faster than one-cluster-at-a-time "
                                   f"reference at the same held-out error (<= {1 + SAME_ERROR_TOL:g}x)"
                                   + ("" if not cfg.gpu else " [CPU target, shown on GPU]"),
                         "shape": shape, "sparsity": sp, "value": speed,
                         "detail": f"error lib {lib['heldout_error']:.4g} vs ref {ref['heldout_error']:.4g}",
                         "pass": bool(speed >= 2.0 and same)})
        if cfg.gpu and cfg.scale == 1 and shape.startswith("7b"):
            rows.append({"target": "GPU 7B: one FFN linear into 16 experts < 10 s end to end",
                         "shape": shape, "sparsity": sp, "value": lib["total_s"], "detail": "seconds",
                         "pass": bool(lib["total_s"] < 10.0 and lib["clusters"] == 16)})
    for r in results["inference"]:
        if r["tokens"] != 4096:
            continue
        for key, what in (("routed_ratio", "routed forward (dense-masked experts)"),
                          ("routed24_ratio", "routed forward (2:4 compressed)")):
            if r.get(key) is not None:
                rows.append({"target": f"{what} <= 1.2x dense nn.Linear at 4096 tokens", "shape": r["shape"],
                             "sparsity": r["sparsity"], "value": r[key], "detail": "time ratio",
                             "pass": bool(r[key] <= 1.2)})
    return rows


def _fmt(v, nd=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "PASS" if v else "FAIL"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{nd}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _table(rows: list[dict], cols: list[tuple[str, str, int]]) -> str:
    lines = ["  ".join(f"{title:<{w}}" for _, title, w in cols).rstrip()]
    for r in rows:
        cells = []
        for key, _, w in cols:
            v = r.get(key)
            text = f"{v:.4g}" if "error" in key and isinstance(v, float) else _fmt(v)
            cells.append(f"{text:<{w}}")
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_report(results: dict) -> str:
    out = []
    out.append("## pruning cost: seconds per stage, peak memory above the pipeline's start (MiB), relative "
               "error on held-out and calibration tokens\n## speedup rows: reference / library for times and "
               "memory (< 1: the library is slower / uses more), reference / library for the error")
    out.append(_table(results["pruning"], [
        ("shape", "shape", 16), ("sparsity", "sparsity", 8), ("method", "method", 16), ("impl", "impl", 9),
        ("clusters", "K", 3), ("router_s", "router", 7), ("hessian_s", "hessian", 7),
        ("inverse_s", "inverse", 7), ("obs_s", "obs", 7), ("total_s", "total", 7),
        ("peak_extra_mb", "peak_MB", 8), ("heldout_error", "heldout_err", 11), ("calib_error", "calib_err", 9)]))
    out.append("\n## reconstruction error on held-out tokens (relative ||WX - W'X||^2 / ||WX||^2)")
    out.append(_table(results["quality"], [
        ("shape", "shape", 16), ("sparsity", "sparsity", 8), ("method", "method", 30),
        ("heldout_error", "heldout_err", 11), ("calib_error", "calib_err", 9), ("seconds", "seconds", 8)]))
    out.append("\n## routed inference (ms; routed includes routing) vs dense nn.Linear")
    out.append(_table(results["inference"], [
        ("shape", "shape", 16), ("sparsity", "sparsity", 8), ("tokens", "tokens", 6),
        ("active_experts", "active", 6), ("dense_ms", "dense", 8), ("routing_ms", "routing", 8),
        ("routed_ms", "routed", 8), ("routed_ratio", "routed/dense", 12), ("routed24_ms", "routed24", 8),
        ("routed24_ratio", "r24/dense", 9)]))
    out.append("\n## targets (pass/fail, not asserted)")
    out.append(_table(results["targets"], [
        ("target", "target", 96), ("shape", "shape", 16), ("sparsity", "sparsity", 8), ("value", "value", 8),
        ("pass", "pass", 5), ("detail", "detail", 0)]))
    for f in results["failures"]:
        out.append(f"# FAILED {f['shape']} {f['sparsity']} {f['task']}: {f['error']}")
    return "\n".join(out)


def device_tag(cfg: BenchConfig) -> str:
    if not cfg.gpu:
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(cfg.device)).strip("_").lower()


def write_csv(results: dict, path: str) -> None:
    """Long format: one measurement per line (section, shape, sparsity, method, impl, tokens, metric, value)."""
    keys = ("shape", "d_in", "d_out", "sparsity", "method", "impl", "clusters", "tokens")
    skip = set(keys) | {"cluster_sizes", "kmeans_backend", "target", "detail"}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", *keys, "metric", "value"])
        for section in ("pruning", "quality", "inference"):
            for r in results[section]:
                for k, v in r.items():
                    if k in skip or isinstance(v, (list, dict)):
                        continue
                    w.writerow([section, *(r.get(c, "") for c in keys), k, "" if v is None else v])
        for r in results["targets"]:
            w.writerow(["targets", r["shape"], "", "", r["sparsity"], r["target"], "", "", "", "pass", r["pass"]])
            w.writerow(["targets", r["shape"], "", "", r["sparsity"], r["target"], "", "", "", "value", r["value"]])
