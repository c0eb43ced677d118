"""Checkpoint cost and resume fidelity on the embedded SmolLM2, through the command line.

The same `sparse-expansion prune` command runs three times, as subprocesses:
  plain     without --checkpoint-dir
  killed    with --checkpoint-dir, SIGKILLed right after block K is committed
            (SPARSE_EXPANSION_KILL_AT=block:K, the fault-injection hook of storage/checkpoint.py)
  resumed   the killed command again: it resumes after block K
and the table reports each run's wall time, the checkpoint's size, the time spent writing
checkpoints against the time spent pruning (from the resumed output's per-block report), peak
memory per block, and whether the resumed model's files are byte-identical to the plain one's.

    python benchmarks/resume.py --method sparsegpt
    python benchmarks/resume.py --method sparse-expansion --extra "--max-cluster-tokens 4096"

Rows are merged into benchmarks/results/resume.json by method + extra arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "resume.json"


def prune(args, out: Path, ckpt: Path | None, kill_at: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "sparse_expansion.cli", "prune", "smollm2", "--method", args.method,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--output", str(out), "--quiet",
           *shlex.split(args.extra)]
    if ckpt is not None:
        cmd += ["--checkpoint-dir", str(ckpt)]
    env = dict(os.environ)
    if kill_at:
        env["SPARSE_EXPANSION_KILL_AT"] = kill_at
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, run


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def perplexity(folder: Path) -> float:
    run = subprocess.run([sys.executable, "-m", "sparse_expansion.cli", "eval", str(folder), "--seqlen", "512",
                          "--max-windows", "24", "--json", "--quiet"], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])["perplexity"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--kill-after", type=int, default=14, help="block after which the checkpointed run is killed")
    p.add_argument("--extra", default="", help="more prune arguments, quoted")
    p.add_argument("--eval", action="store_true", help="also the perplexity of the resumed model (protocol windows)")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="resume-bench-"))
    try:
        t_plain, plain = prune(args, work / "plain", None)
        if plain.returncode:
            sys.exit(plain.stderr)
        t_killed, killed = prune(args, work / "resumed", work / "ckpt", f"block:{args.kill_after}")
        assert killed.returncode == -9, killed.stderr
        assert not (work / "resumed").exists(), "a killed run left a folder at --output"
        t_resumed, resumed = prune(args, work / "resumed", work / "ckpt")
        if resumed.returncode:
            sys.exit(resumed.stderr)
        meta = json.loads((work / "resumed" / "sparse_expansion.json").read_text())
        blocks = meta["blocks"]
        state = json.loads((work / "ckpt" / "checkpoint.json").read_text())
        row = {
            "method": args.method, "extra": args.extra, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "kill_after_block": args.kill_after, "blocks": len(blocks),
            "seconds_plain": t_plain, "seconds_killed": t_killed, "seconds_resumed": t_resumed,
            "resume_overhead": (t_killed + t_resumed) / t_plain,
            "identical_to_plain": digests(work / "plain") == digests(work / "resumed"),
            "checkpoint_bytes": sum(f.stat().st_size for f in (work / "ckpt").iterdir()),
            "activation_bytes": state["activations"]["bytes"],
            "seconds_checkpoint_per_block": sum(b.get("seconds_checkpoint", 0) for b in blocks[args.kill_after + 1:])
            / max(len(blocks) - args.kill_after - 1, 1),
            "seconds_block_mean": sum(b["seconds"] for b in blocks) / len(blocks),
            "peak_rss_bytes_max": max(b["peak_rss_bytes"] or 0 for b in blocks),
            "resume_message": next((line for line in resumed.stderr.splitlines() if line.startswith("resuming")), None),
        }
        if args.eval:
            row["perplexity"] = perplexity(work / "resumed")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    rows = [r for r in rows if (r["method"], r["extra"]) != (row["method"], row["extra"])] + [row]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| method | extra | plain (s) | killed + resumed (s) | ratio | checkpoint (MiB) | activations (MiB) | "
             "save per block (s) | block (s) | peak RSS (GiB) | identical | perplexity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['extra'] or '-'} | {r['seconds_plain']:.0f} | "
                     f"{r['seconds_killed']:.0f} + {r['seconds_resumed']:.0f} | {r['resume_overhead']:.2f} | "
                     f"{r['checkpoint_bytes'] / 2**20:.1f} | {r['activation_bytes'] / 2**20:.1f} | "
                     f"{r['seconds_checkpoint_per_block']:.2f} | {r['seconds_block_mean']:.1f} | "
                     f"{r['peak_rss_bytes_max'] / 2**30:.2f} | {'yes' if r['identical_to_plain'] else 'NO'} | "
                     f"{r.get('perplexity', float('nan')):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
