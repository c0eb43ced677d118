"""llm-compressor's SparseGPT or Wanda on given calibration token ids; runs in llm-compressor's own
environment (it pins another transformers), never imports sparse_expansion. benchmarks/peers.py
drives it and scores the saved folder with our evaluator.

    PEER_PYTHON benchmarks/peer_llmcompressor.py --model DIR --calib ids.pt --method sparsegpt --output OUT

Prints one JSON line: pruning seconds (oneshot only) and this process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

FFN = ["re:.*mlp.(gate|up|down)_proj$"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True, help="torch.save'd int64 token ids [N, L]")
    p.add_argument("--method", choices=["sparsegpt", "wanda"], default="sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--owl", action="store_true", help="llm-compressor's OWL layer-wise sparsity profile")
    p.add_argument("--output", required=True)
    args = p.parse_args()

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    ids = torch.load(args.calib)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    common = dict(sparsity=args.sparsity, targets=FFN, sparsity_profile="owl" if args.owl else None)
    recipe = (SparseGPTModifier(block_size=128, dampening_frac=0.01, **common) if args.method == "sparsegpt"
              else WandaPruningModifier(**common))
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.output, save_compressed=False)
    tokenizer.save_pretrained(args.output)
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
