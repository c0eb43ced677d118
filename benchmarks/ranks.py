"""Several ranks against one: the same Sparse Expansion run through torchrun with 1 and N CPU
ranks (gloo, one thread each) on the embedded SmolLM2; same output files? pruning-stage ratio.

    python benchmarks/ranks.py --ranks 2 --blocks 0:6

Prints a table and writes benchmarks/results/ranks.json. Timing needs an otherwise idle machine
with at least N cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "ranks.json"


def prune(ranks: int, out: Path, args) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(ranks), "-m", "sparse_expansion.cli", "prune",
           "smollm2", "--method", "sparse-expansion", "--clusters", str(args.clusters), "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--blocks", args.blocks, "--output", str(out), "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if run.returncode:
        sys.exit(run.stderr[-3000:])
    meta = json.loads((out / "sparse_expansion.json").read_text())
    digest = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.glob("*.safetensors"))}
    return {"ranks": ranks, "pruning_seconds": sum(b["seconds"] for b in meta["blocks"]), "files": digest}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--blocks", default="0:6")
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = prune(1, Path(tmp) / "one", args)
        many = prune(args.ranks, Path(tmp) / "many", args)
    row = {"blocks": args.blocks, "clusters": args.clusters, "calibration": f"{args.nsamples}x{args.seqlen}",
           "seconds_1_rank": one["pruning_seconds"], f"seconds_{args.ranks}_ranks": many["pruning_seconds"],
           "speedup": one["pruning_seconds"] / many["pruning_seconds"], "identical_files": one["files"] == many["files"]}
    print("| ranks | pruning s (blocks " + args.blocks + ") | speed-up | same files |\n|---|---|---|---|")
    print(f"| 1 | {one['pruning_seconds']:.1f} | 1.00 | |")
    print(f"| {args.ranks} | {many['pruning_seconds']:.1f} | {row['speedup']:.2f} | {row['identical_files']} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
