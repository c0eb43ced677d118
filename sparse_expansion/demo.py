"""`make demo`: held-out perplexity and last-word accuracy of the embedded SmolLM2-135M at 50%
unstructured FFN sparsity.

By default dense, SparseGPT and Sparse Expansion with 16 clusters (default options): the
comparison the paper makes, within 15 minutes on a 2-core CPU. `--methods all` adds magnitude and
Wanda (about 20 minutes there). Same calibration windows (32 x 512 tokens of the Wikipedia train
split, seed 0), the same 24 evaluation windows of 512 tokens and the same first `lastword`
documents of the embedded wiki_lastword task (scored by lm-eval) for every method; dense first,
then each method on a fresh copy. Sparse Expansion's experts are evaluated dense (16 copies in
memory: faster on a CPU than decompressing them batch by batch; the same numbers). Writes the
table as JSON to runs/demo.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers.utils import logging as hf_logging

from .config import PruneConfig
from .data import calibration_windows, evaluation_windows
from .driver import prune_model
from .downstream import WIKI_TASK, prepare_tasks, run_tasks
from .evaluate import perplexity
from .methods.expansion.experts import convert_experts
from .storage.loading import SMOLLM2, load_model
from .methods import METHODS

def evaluate(model, tokenizer, evalw, tasks, lastword: int, progress: bool) -> dict:
    t0 = time.perf_counter()
    result = perplexity(model, evalw, progress=progress)
    t1 = time.perf_counter()
    accuracy = run_tasks(model, tokenizer, [WIKI_TASK], tasks, lastword, batch_size=8, progress=progress)[WIKI_TASK]
    return {**result, "lastword_acc": accuracy["acc"], "lastword_stderr": accuracy["acc_stderr"],
            "lastword_examples": accuracy["examples"], "perplexity_seconds": t1 - t0,
            "lastword_seconds": time.perf_counter() - t1}


DEFAULT_METHODS = ("sparsegpt", "sparse-expansion")


def run(methods=DEFAULT_METHODS, sparsity: str = "0.5", nsamples: int = 32, seqlen: int = 512, windows: int = 24,
        lastword: int = 100, seed: int = 0, progress: bool = True) -> list[dict]:
    tasks = prepare_tasks([WIKI_TASK])
    model, tokenizer = load_model(SMOLLM2)
    calib = calibration_windows(tokenizer, "wiki", nsamples, seqlen, seed)
    evalw = evaluation_windows(tokenizer, "wiki", seqlen, windows)
    rows = [{"method": "dense", "sparsity": 0.0, **evaluate(model, tokenizer, evalw, tasks, lastword, progress),
             "prune_seconds": 0.0}]
    print(f"dense: perplexity {rows[0]['perplexity']:.3f}, last-word accuracy {rows[0]['lastword_acc']:.3f}",
          flush=True)
    for method in methods:
        model, _ = load_model(SMOLLM2)
        t0 = time.perf_counter()
        config = PruneConfig(method=method, sparsity=sparsity)
        pruned = prune_model(model, calib, config, progress=progress)
        seconds = time.perf_counter() - t0
        convert_experts(model, "dense")
        result = evaluate(model, tokenizer, evalw, tasks, lastword, progress)
        rows.append({"method": config.make_method().label(), "sparsity": pruned.sparsity, **result,
                     "prune_seconds": seconds})
        print(f"{method}: perplexity {result['perplexity']:.3f}, last-word accuracy {result['lastword_acc']:.3f} "
              f"(pruned in {seconds:.0f} s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | FFN sparsity | wiki-test perplexity | last-word accuracy | prune time (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['sparsity']:.1%} | {r['perplexity']:.3f} | "
                     f"{r['lastword_acc']:.3f} ± {r['lastword_stderr']:.3f} | {r['prune_seconds']:.0f} |")
    first = rows[0]
    lines.append(f"\nPerplexity: {first['tokens']} predicted tokens ({first['windows']} windows of {first['seqlen']}). "
                 f"Last-word accuracy ({WIKI_TASK}, lm-eval): the first {first['lastword_examples']} documents, "
                 f"± one standard error.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, or all: {', '.join(METHODS)}")
    p.add_argument("--output", default="runs/demo.json")
    p.add_argument("--lastword", type=int, default=100, help="documents of the last-word task to score")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.quiet:
        hf_logging.disable_progress_bar()
    methods = tuple(METHODS) if args.methods == "all" else tuple(args.methods.split(","))
    rows = run(methods, lastword=args.lastword, progress=not args.quiet)
    print()
    print(table(rows))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
