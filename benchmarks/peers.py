"""Side by side with llm-compressor: the same calibration windows, SparseGPT and Wanda at 50% on
SmolLM2's FFN linears, each run in a fresh process, every output scored by our evaluator.

    make peers      # builds .venv-peers (llm-compressor pins another transformers) and runs this
    python benchmarks/peers.py --peer-python .venv-peers/bin/python [--methods sparsegpt,wanda] [--threads 1,2]

Prints a table and writes benchmarks/results/peers.json: wiki perplexity (24 x 512 test
windows), pruning seconds (the pruning call only), wall seconds (the whole process: imports,
loading, pruning, saving) and peak RSS, ours beside theirs as ratios. Skips (exit 0) when the
peer environment is missing. Timing needs an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from peer_llmcompressor import peak_rss_bytes  # beside this file; imports nothing of the peer at the top

RESULTS = Path(__file__).resolve().parent / "results" / "peers.json"
PEER = Path(__file__).resolve().parent / "peer_llmcompressor.py"



def run_ours(method: str, calib: str, output: str) -> None:
    """In a fresh process: our `method` on the token ids in `calib`; prints one JSON line."""
    import sparse_expansion as se
    from sparse_expansion.storage.loading import SMOLLM2, load_model

    model, tokenizer = load_model(SMOLLM2, torch.float32)
    t0 = time.perf_counter()
    se.prune(model, method=method, sparsity=0.5, calib=torch.load(calib), progress=False)
    seconds = time.perf_counter() - t0
    se.save(model, output, tokenizer=tokenizer)
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}))


def timed(cmd: list[str], threads: int) -> dict:
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if run.returncode:
        sys.exit(f"{' '.join(cmd[:3])} ... failed:\n{run.stderr[-3000:]}")
    return {**json.loads(run.stdout.strip().splitlines()[-1]), "wall_seconds": time.perf_counter() - t0}


def perplexity_of(folder: Path) -> float:
    from sparse_expansion.data import evaluation_windows
    from sparse_expansion.evaluate import perplexity
    from sparse_expansion.storage.loading import load_model

    model, tokenizer = load_model(str(folder), torch.float32)
    return perplexity(model, evaluation_windows(tokenizer, "wiki", 512, 24), 4, progress=False)["perplexity"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-python", default=".venv-peers/bin/python", help="python of llm-compressor's environment")
    p.add_argument("--methods", default="sparsegpt,wanda")
    p.add_argument("--threads", default="2", help="CPU threads per run; several (e.g. 1,2) repeat every run at each, "
                                                  "which shows how far float rounding alone moves each result")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ours", nargs=3, metavar=("METHOD", "CALIB", "OUTPUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ours:
        return run_ours(*args.ours)
    if not Path(args.peer_python).exists():
        print(f"peers: skipped, no peer environment at {args.peer_python} (make peers builds it)")
        return

    from sparse_expansion.data import calibration_windows
    from sparse_expansion.storage.loading import SMOLLM2, load_tokenizer, smollm2_folder

    calib = calibration_windows(load_tokenizer(SMOLLM2), "wiki", args.nsamples, args.seqlen, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "calib.pt"
        torch.save(calib, ids)
        model_folder = str(smollm2_folder())  # the embedded model as a plain transformers folder
        methods, threads = args.methods.split(","), [int(t) for t in args.threads.split(",")]
        runs = [(m, who, t) for who in ("ours", "llm-compressor") for t in threads for m in methods]
        for method, who, n in runs:
            out = Path(tmp) / f"{who}-{method}-{n}"
            if who == "ours":
                cmd = [sys.executable, __file__, "--ours", method, str(ids), str(out)]
            else:
                cmd = [args.peer_python, str(PEER), "--model", model_folder, "--calib", str(ids), "--method", method,
                       "--output", str(out)]
            row = {"method": method, "implementation": who, "threads": n, **timed(cmd, n)}
            row["perplexity"] = perplexity_of(out)
            shutil.rmtree(out)
            rows.append(row)
            print(f"{row['method']} {who} ({n} threads): ppl {row['perplexity']:.3f}, {row['seconds']:.1f} s",
                  file=sys.stderr)
    print(f"calibration: {args.nsamples} x {args.seqlen} wiki windows (seed 0, token-id sum {int(calib.sum())}); "
          f"50% unstructured on the FFN linears; evaluation: wiki test, 24 x 512")
    print("| method | implementation | threads | wiki ppl | pruning s | wall s | peak RSS GiB "
          "| pruning speed vs peer |\n"
          "|---|---|---|---|---|---|---|---|")
    for row in rows:
        peer = next((r for r in rows if r["method"] == row["method"] and r["threads"] == row["threads"]
                     and r["implementation"] == "llm-compressor"), None)
        ratio = f"{peer['seconds'] / row['seconds']:.2f}x" if peer and row is not peer else ""
        print(f"| {row['method']} | {row['implementation']} | {row['threads']} | {row['perplexity']:.3f} | "
              f"{row['seconds']:.1f} | {row['wall_seconds']:.1f} | {row['peak_rss_bytes'] / 2**30:.2f} | {ratio} |")
    RESULTS.write_text(json.dumps({"nsamples": args.nsamples, "seqlen": args.seqlen,
                                   "calibration_token_sum": int(calib.sum()), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
