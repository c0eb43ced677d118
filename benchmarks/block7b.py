"""One decoder block of Llama-2-7B's shape (random bf16 weights) pruned on this machine: the
measured peak memory beside the planner's prediction, and the time of each stage.

    python benchmarks/block7b.py --method sparse-expansion --clusters 16 --max-memory 12GiB

Calibration: 16 x 512 tokens of the embedded corpus through the SmolLM2 tokenizer (the vocabulary
is SmolLM2's so that the tokens are real; the block's shape is Llama-2-7B's). The pruning runs in
this process on the CPU (or --device cuda); the memory it adds above the loaded model is the
kernel's peak RSS (or the CUDA allocator's peak). Prints a table, writes
benchmarks/results/block7b_<method>.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from sparse_expansion.checks import size_bytes
from sparse_expansion.config import PruneConfig
from sparse_expansion.data import calibration_windows
from sparse_expansion.driver import prune_model
from sparse_expansion.storage.loading import load_tokenizer
from sparse_expansion.memory import CUDA, RSS, PeakMemory, rss_bytes
from sparse_expansion.methods import ExpansionOptions
from sparse_expansion.models import decoder_blocks
from sparse_expansion.plan import PUBLISHED, plan_run

RESULTS = Path(__file__).resolve().parent / "results"


def block_model(vocab: int, dtype: torch.dtype) -> torch.nn.Module:
    shape = {k: v for k, v in PUBLISHED["llama-2-7b"].items() if k not in ("dtype", "vocab_size")}
    torch.manual_seed(0)
    config = LlamaConfig(**{**shape, "num_hidden_layers": 1, "vocab_size": vocab})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.config.use_cache = False
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="sparse-expansion")
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-memory", default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    dtype = torch.bfloat16
    options = ExpansionOptions(clusters=args.clusters) if args.method == "sparse-expansion" else None
    config = PruneConfig(args.method, "0.5", options=options, max_memory=size_bytes(args.max_memory, "--max-memory"))
    tokenizer = load_tokenizer("smollm2")
    calib = calibration_windows(tokenizer, "wiki", args.nsamples, args.seqlen, 0)
    model = block_model(len(tokenizer), dtype)
    device_memory = torch.cuda.mem_get_info()[0] if args.device == "cuda" else None
    plan = plan_run(model, config, args.nsamples, args.seqlen, dtype, args.device, device_memory)
    print(plan.table())
    with torch.no_grad():
        model(calib[:1])  # the runtime's one-off buffers are not the run's
    loaded = rss_bytes()
    t0 = time.perf_counter()
    with PeakMemory(args.device, reset_rss=True) as memory:
        result = prune_model(model, calib, config, progress=True, device=args.device)
    seconds = time.perf_counter() - t0
    resident = sum(p.numel() for p in decoder_blocks(model)[0].parameters()) * dtype.itemsize
    if args.device == "cuda":
        measured, predicted = memory.peak[CUDA], plan.peak_device
    else:
        measured, predicted = memory.above_start(RSS), plan.peak_device - resident
    stages = {}
    for r in result.layers:
        for key in ("seconds_router", "seconds_hessian"):
            stages[f"{r.layer} {key[8:]}"] = r.extras.get(key)
        stages[f"{r.layer} solve"] = r.seconds_solve
    row = {"method": config.make_method().label(),
           "device": args.device, "calibration": f"{args.nsamples} x {args.seqlen}", "max_memory": config.max_memory,
           "measured_peak_bytes": measured, "predicted_peak_bytes": predicted, "ratio": measured / predicted,
           "process_peak_rss_bytes": memory.peak[RSS], "rss_before_bytes": loaded,
           "predicted_host_bytes": plan.peak_host, "host_ratio": memory.peak[RSS] / plan.peak_host,
           "seconds": seconds, "stage_seconds": stages,
           "chunks": {g.group: g.chunks for g in plan.groups}, "plan": plan.to_dict(), "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    print(f"\n{row['method']} on one Llama-2-7B block ({args.device}, bf16, {row['calibration']} tokens)")
    print(f"peak memory of the run: measured {measured / 2**30:.2f} GiB, planned {predicted / 2**30:.2f} GiB "
          f"(ratio {row['ratio']:.2f}); process peak {memory.peak[RSS] / 2**30:.2f} GiB, planned host "
          f"{plan.peak_host / 2**30:.2f} GiB (ratio {row['host_ratio']:.2f}); {seconds:.0f} s in all")
    for name, s in stages.items():
        if s is not None:
            print(f"  {name:<40} {s:8.1f} s")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"block7b_{args.method}_{args.device}.json"
    out.write_text(json.dumps(row, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
