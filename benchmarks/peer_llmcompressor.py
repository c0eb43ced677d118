"""llm-compressor's SparseGPT or Wanda on given calibration token ids; runs in llm-compressor's own
environment (it pins another transformers), never imports sparse_expansion. benchmarks/peers.py
drives it and scores the saved folder with our evaluator. (Its OWL profile is not offered:
llmcompressor 0.14.0.1 fails with "Cannot invoke event before initializing" when OWL runs its
activation pass during the modifier's initialization.)

    PEER_PYTHON benchmarks/peer_llmcompressor.py --model DIR --calib ids.pt --method sparsegpt --output OUT

Prints one JSON line: pruning seconds (oneshot only) and this process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

FFN = ["re:.*mlp.(gate|up|down)_proj$"]



def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (VmHWM: unlike ru_maxrss, it does
    not inherit the RSS of the process that forked it)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True, help="torch.save'd int64 token ids [N, L]")
    p.add_argument("--method", choices=["sparsegpt", "wanda"], default="sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--output", required=True)
    args = p.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    ids = torch.load(args.calib)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    common = dict(sparsity=args.sparsity, targets=FFN)
    recipe = (SparseGPTModifier(block_size=128, dampening_frac=0.01, **common) if args.method == "sparsegpt"
              else WandaPruningModifier(**common))
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.output, save_compressed=False)
    tokenizer.save_pretrained(args.output)
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}))


if __name__ == "__main__":
    main()
