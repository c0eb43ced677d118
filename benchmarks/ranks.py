"""Several ranks against one: the same run through torchrun with 1 and N CPU ranks (gloo, one
thread each) on the embedded SmolLM2: the same model? and the pruning stage's wall-clock ratio.

    python benchmarks/ranks.py --ranks 2 --blocks 0:4                      # Sparse Expansion (16)
    python benchmarks/ranks.py --ranks 2 --method sparsegpt --blocks 0:30 --eval

Sparse Expansion splits the experts (the result should be the same files); SparseGPT splits the
calibration batches and the rows (the same masks, weights up to the rounding of the Hessian's
sum). Prints a table and writes benchmarks/results/ranks[_METHOD].json. Timing needs an
otherwise idle machine with at least N cores.
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

from safetensors.torch import load_file

RESULTS = Path(__file__).resolve().parent / "results"


def cli(*args: str, ranks: int | None = None) -> subprocess.CompletedProcess:
    launcher = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(ranks)] \
        if ranks else [sys.executable]
    run = subprocess.run([*launcher, "-m", "sparse_expansion.cli", *args], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if run.returncode:
        sys.exit(run.stderr[-3000:])
    return run


def prune(ranks: int, out: Path, args) -> dict:
    method = ["--method", args.method] + (["--clusters", str(args.clusters)]
                                          if args.method == "sparse-expansion" else [])
    cli("prune", "smollm2", *method, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
        "--blocks", args.blocks, "--output", str(out), "--quiet", ranks=ranks)
    meta = json.loads((out / "sparse_expansion.json").read_text())
    row = {"ranks": ranks, "pruning_seconds": sum(b["seconds"] for b in meta["blocks"])}
    if args.eval:
        run = cli("eval", str(out), "--seqlen", "512", "--max-windows", "24", "--quiet", "--json")
        row["perplexity"] = json.loads(run.stdout.strip().splitlines()[-1])["perplexity"]
    return row


def compare(one: Path, many: Path) -> dict:
    """Same files? Over every weight: the share of entries pruned in one and not the other, and
    the largest difference relative to the tensor's largest entry."""
    files = sorted(p.name for p in one.glob("*.safetensors"))
    same = all(hashlib.sha256((one / f).read_bytes()).digest() == hashlib.sha256((many / f).read_bytes()).digest()
               for f in files)
    flips = entries = 0
    worst = 0.0
    for f in files:
        a, b = load_file(one / f), load_file(many / f)
        for key, x in a.items():
            y = b[key]
            if not x.is_floating_point():
                flips += int((x != y).sum())
                continue
            flips += int(((x == 0) != (y == 0)).sum())
            entries += x.numel()
            worst = max(worst, float((x.double() - y.double()).abs().max() / x.double().abs().max().clamp(min=1e-30)))
    return {"identical_files": same, "mask_flips": flips, "entries": entries, "max_relative_difference": worst}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--method", default="sparse-expansion", choices=["sparse-expansion", "sparsegpt", "wanda"])
    p.add_argument("--blocks", default="0:6")
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval", action="store_true", help="also the perplexity of both (wiki, 24 x 512)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = prune(1, Path(tmp) / "one", args)
        many = prune(args.ranks, Path(tmp) / "many", args)
        same = compare(Path(tmp) / "one", Path(tmp) / "many")
    row = {"method": args.method, "blocks": args.blocks, "calibration": f"{args.nsamples}x{args.seqlen}",
           **({"clusters": args.clusters} if args.method == "sparse-expansion" else {}),
           "seconds_1_rank": one["pruning_seconds"], f"seconds_{args.ranks}_ranks": many["pruning_seconds"],
           "speedup": one["pruning_seconds"] / many["pruning_seconds"], **same}
    if args.eval:
        row.update(perplexity_1_rank=one["perplexity"], **{f"perplexity_{args.ranks}_ranks": many["perplexity"]})
    print(f"{args.method}, blocks {args.blocks}, {args.nsamples} x {args.seqlen} tokens")
    print("| ranks | pruning s | speed-up | same files | mask flips | max rel. difference |"
          + (" perplexity |" if args.eval else "") + "\n|---|---|---|---|---|---|" + ("---|" if args.eval else ""))
    for r in (one, many):
        extra = f" {r['perplexity']:.3f} |" if args.eval else ""
        if r is one:
            print(f"| 1 | {r['pruning_seconds']:.1f} | 1.00 | | | |{extra}")
        else:
            print(f"| {args.ranks} | {r['pruning_seconds']:.1f} | {row['speedup']:.2f} | {same['identical_files']} | "
                  f"{same['mask_flips']} of {same['entries']} | {same['max_relative_difference']:.2g} |{extra}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.method == "sparse-expansion" else f"_{args.method}"
    (RESULTS / f"ranks{suffix}.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
