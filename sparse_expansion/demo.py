"""`make demo`: held-out perplexity of the embedded SmolLM2-135M at 50% unstructured FFN sparsity.

Dense, magnitude, Wanda, SparseGPT and Sparse Expansion with 16 clusters (default options).
Same calibration windows (32 x 512 tokens of the Wikipedia train split, seed 0) and the same 24
evaluation windows of 512 tokens for every method; dense first, then each method on a fresh copy.
Writes the table as JSON to runs/demo.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .config import PruneConfig
from .data import calibration_windows, evaluation_windows
from .driver import prune_model
from .evaluate import perplexity
from .loading import SMOLLM2, load_model
from .methods import METHODS

def run(methods=tuple(METHODS), sparsity: str = "0.5", nsamples: int = 32, seqlen: int = 512, windows: int = 24,
        seed: int = 0, progress: bool = True) -> list[dict]:
    model, tokenizer = load_model(SMOLLM2)
    calib = calibration_windows(tokenizer, "wiki", nsamples, seqlen, seed)
    evalw = evaluation_windows(tokenizer, "wiki", seqlen, windows)
    rows = [{"method": "dense", "sparsity": 0.0, **perplexity(model, evalw, progress=progress), "prune_seconds": 0.0}]
    print(f"dense: perplexity {rows[0]['perplexity']:.3f}", flush=True)
    for method in methods:
        model, _ = load_model(SMOLLM2)
        t0 = time.perf_counter()
        config = PruneConfig(method=method, sparsity=sparsity)
        pruned = prune_model(model, calib, config, progress=progress)
        seconds = time.perf_counter() - t0
        result = perplexity(model, evalw, progress=progress)
        rows.append({"method": config.make_method().label(), "sparsity": pruned.sparsity, **result,
                     "prune_seconds": seconds})
        print(f"{method}: perplexity {result['perplexity']:.3f} (pruned in {seconds:.0f} s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | FFN sparsity | wiki-test perplexity | prune time (s) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['sparsity']:.1%} | {r['perplexity']:.3f} | {r['prune_seconds']:.0f} |")
    lines.append(f"\n{rows[0]['tokens']} predicted tokens ({rows[0]['windows']} windows of {rows[0]['seqlen']}).")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--output", default="runs/demo.json")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    rows = run(tuple(args.methods.split(",")), progress=not args.quiet)
    print()
    print(table(rows))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
