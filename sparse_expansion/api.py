"""The Python API: `prune`, `save`, `load` (and `load_tokenizer`), the command line's steps as
functions.

    import sparse_expansion as se
    model, result = se.prune("smollm2", method="sparse-expansion", sparsity=0.5, nsamples=32, seqlen=512,
                             clusters=16)
    se.save(model, "out/se16", tokenizer=se.load_tokenizer("smollm2"), result=result)
    model, tokenizer = se.load("out/se16")
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import PruneConfig
from .data import calibration_windows, check_source
from .driver import prune_model
from .errors import UsageError
from .storage.loading import load_model, load_tokenizer, model_dtype
from .storage.outputs import save_pruned_model
from .reports import PruneResult


def prune(model: nn.Module | str, method: str = "sparse-expansion", sparsity: float | str = 0.5,
          calib: str | torch.Tensor = "wiki", nsamples: int = 128, seqlen: int = 2048, *, tokenizer=None,
          bits: int | None = None, targets: str = "ffn", batch_size: int = 8, sequential: bool = False,
          blocks: tuple[int, int] | None = None, seed: int = 0, max_memory: int | None = None,
          allocation: str = "uniform", owl_m: float = 5.0, owl_lambda: float = 0.08, dtype: str = "auto", device: str | None = None, offload_activations: bool = False,
          progress: bool = True, **options) -> tuple[nn.Module, PruneResult]:
    """Prune `model` and return it with the run's `PruneResult` (per-layer reports; `.config`
    holds the run's settings as a dict).

    model: a transformers causal LM (pruned in place), or a reference the CLI takes (a folder,
    a hub id, a .gguf file, "smollm2" or "gemma3"), loaded in `dtype` ("auto": the checkpoint's own) on the CPU.
    calib: a source name or path ("wiki", "sotu", a .txt file or folder, "wikitext2", "c4"), from which
    `nsamples` windows of `seqlen` tokens are drawn with `seed` (needs the tokenizer, found
    from a reference); or token ids [N, L] used as they are.
    options: the method's own settings by name (e.g. clusters=16 for sparse-expansion,
    percdamp=0.01 for sparsegpt); an unknown one is refused.
    allocation: "uniform" (every block at `sparsity`) or "owl" (per-block rates within
    ±owl_lambda of it, from the blocks' outlier ratios; see sparse_expansion/allocation.py).
    device: where each decoder block is calibrated and pruned (the model stays where it is);
    None: where the model is.
    """
    config = PruneConfig(method, sparsity, bits=bits, targets=targets, batch_size=batch_size, sequential=sequential,
                         blocks=blocks, seed=seed, max_memory=max_memory, allocation=allocation, owl_m=owl_m,
                         owl_lambda=owl_lambda, options=options or None)
    if isinstance(model, (str, Path)):
        reference = str(model)
        model, tokenizer = load_model(reference, model_dtype(reference, dtype), "cpu")
    elif dtype != "auto":
        raise UsageError(f"dtype={dtype!r} applies to a model reference; cast a model object yourself")
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.int32, torch.int64):
            raise UsageError(f"calib: token ids [N, L] (int64), got {calib.dtype} of shape {list(calib.shape)}")
        calibration = calib.long()
    else:
        if tokenizer is None:
            raise UsageError("calib names a text source: pass tokenizer=..., or token ids [N, L] as calib")
        check_source(calib)
        calibration = calibration_windows(tokenizer, calib, nsamples, seqlen, seed)
    result = prune_model(model, calibration, config, progress=progress, device=device,
                         offload_activations=offload_activations)
    result.config = config.as_dict()
    return model, result


def save(model: nn.Module, output: str | Path, tokenizer=None, result: PruneResult | None = None,
         overwrite: bool = False, weight_format: str = "auto") -> Path:
    """Write `model` (with its routed experts, if any) as a folder `load` and transformers'
    `AutoModelForCausalLM.from_pretrained` read; `result`'s reports go to sparse_expansion.json.
    weight_format: 'auto' (compressed-tensors integer weights for a model pruned with `bits`,
    dense otherwise), 'dense' or 'compressed-tensors'."""
    metadata = {"command": "api"}
    if result is not None:
        metadata.update(config=result.config, **result.to_dict())
    return save_pruned_model(model, tokenizer, str(output), metadata, overwrite=overwrite,
                             weight_format=weight_format)


def load(reference: str | Path, device: str = "cpu", dtype: str = "auto") -> tuple[nn.Module, object]:
    """(model, tokenizer) from a folder written by `save` or `prune`, or any reference the CLI
    takes, in `dtype` ("auto": the checkpoint's own) on `device`."""
    reference = str(reference)
    return load_model(reference, model_dtype(reference, dtype), device)


__all__ = ["prune", "save", "load", "load_tokenizer"]
