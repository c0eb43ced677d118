"""Perplexity over non-overlapping held-out windows: exp(mean NLL of every shifted prediction)."""
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


LOGITS_BUDGET = 256 * 2**20  # bytes of logits a forward pass may hold when the batch size is left to us
MOST_WINDOWS = 4


def windows_per_pass(vocab: int, seqlen: int, element: int) -> int:
    """Windows scored per forward pass by default: as many as keep the batch's logits (`element`
    bytes per value) under LOGITS_BUDGET, at least one and at most MOST_WINDOWS. The logits, not
    the model, set eval's peak once experts are read lazily (SmolLM2: 96 MiB a 512-token window)."""
    return max(1, min(MOST_WINDOWS, LOGITS_BUDGET // (seqlen * vocab * element)))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int | None = None, progress: bool = True) -> dict:
    """windows: [W, L] token ids. Returns {'perplexity', 'nll', 'tokens', 'windows', 'seqlen'}.

    Each window is scored on its own (no context carried over); `tokens` counts the predictions.
    `batch_size`: windows per forward pass (default: `windows_per_pass`).
    """
    first = next(model.parameters())
    device = first.device
    if batch_size is None:
        batch_size = windows_per_pass(model.config.vocab_size, windows.shape[1], first.element_size())
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
