"""The planner's table: published model shapes x methods x GPUs, from the configs alone.

    python benchmarks/plan_table.py [--nsamples 128 --seqlen 2048] [--offload-activations]

Each cell is what `sparse-expansion plan MODEL --method M --device-memory X [--ranks 8]` says:
fits / chunking (the largest number of chunks a group is split into) / not possible, and the
predicted peak device memory. Predictions, not measurements (benchmarks/block7b.py measures one
block on this machine beside its prediction). Prints markdown, writes
benchmarks/results/plan_table.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparse_expansion.config import PruneConfig
from sparse_expansion.methods import ExpansionOptions
from sparse_expansion.plan import PUBLISHED, plan_run, planning_model

RESULTS = Path(__file__).resolve().parent / "results" / "plan_table.json"
GPUS = {"24 GB": (24e9, 1), "80 GB": (80e9, 1), "141 GB": (141e9, 1), "8 x 80 GB": (80e9, 8)}
METHODS = {"SparseGPT": ("sparsegpt", None), "SE4": ("sparse-expansion", 4), "SE16": ("sparse-expansion", 16)}


def cell(plan) -> str:
    if plan.invalid:  # the world size does not divide the work
        return "refused: " + ("more ranks than clusters" if plan.method == "sparse-expansion"
                              else "more ranks than batches")
    peak = f"{plan.peak_device / 2**30:.1f} GiB"
    if plan.verdict == "chunking":
        return f"chunks x{max(g.chunks for g in plan.groups)}, {peak}"
    return f"{'fits' if plan.verdict == 'fits' else 'no'}, {peak}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--offload-activations", action="store_true")
    args = p.parse_args()
    rows, sizes = [], []
    print(f"| model | method | {' | '.join(GPUS)} |\n|---|---|{'---|' * len(GPUS)}")
    for name in PUBLISHED:
        model = planning_model(name)
        for label, (method, clusters) in METHODS.items():
            options = ExpansionOptions(clusters=clusters) if clusters else None
            config = PruneConfig(method, "0.5", options=options)
            cells = []
            for gpu, (memory, ranks) in GPUS.items():
                plan = plan_run(model, config, args.nsamples, args.seqlen, torch.bfloat16, "cuda", int(memory),
                                ranks, args.offload_activations)
                cells.append(cell(plan))
                rows.append({"model": name, "method": label, "gpu": gpu, **plan.to_dict()})
            print(f"| {name} | {label} | {' | '.join(cells)} |")
            sizes.append((name, label, plan.peak_host, plan.checkpoint_bytes, plan.output_bytes))
    print("\n| model | method | host memory | checkpoint | output |\n|---|---|---|---|---|")
    for name, label, host, checkpoint, output in sizes:
        print(f"| {name} | {label} | {host / 2**30:.0f} GiB | {checkpoint / 2**30:.0f} GiB | "
              f"{output / 2**30:.0f} GiB |")
    RESULTS.parent.mkdir(exist_ok=True)
    out = RESULTS if not args.offload_activations else RESULTS.with_name("plan_table_offload.json")
    out.write_text(json.dumps({"nsamples": args.nsamples, "seqlen": args.seqlen, "dtype": "bfloat16",
                               "offload_activations": args.offload_activations, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
