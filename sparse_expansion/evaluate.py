"""Perplexity over non-overlapping held-out windows: exp(mean NLL of every shifted prediction)."""
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """windows: [W, L] token ids. Returns {'perplexity', 'nll', 'tokens', 'windows', 'seqlen'}.

    Each window is scored on its own (no context carried over); `tokens` counts the predictions.
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="eval", disable=not progress, leave=False):
        ids = windows[start:start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits
        # window by window: one window's fp32 log-softmax at a time beside the batch's logits
        total_nll += sum(F.cross_entropy(row[:-1].float(), window[1:], reduction="sum")
                         for row, window in zip(logits, ids)).item()
        total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens,
            "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])}
