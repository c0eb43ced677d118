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

from . import checks
from .config import PruneConfig
from .data import calibration_windows
from .driver import prune_model
from .errors import UsageError
from .storage.loading import load_model, load_tokenizer, model_dtype
from .models import family_of
from .storage.outputs import PartialOutput, check_output, read_spilled_lazily, save_pruned_model, spill_block
from .reports import PruneResult


def prune(model: nn.Module | str, method: str = "sparsegpt", sparsity: float | str = 0.5,
          calib: str | torch.Tensor = "wiki", nsamples: int = 128, seqlen: int = 2048, *, tokenizer=None,
          bits: int | None = None, targets: str = "ffn", batch_size: int = 8, sequential: bool = False,
          blocks: tuple[int, int] | None = None, seed: int = 0, max_memory: int | None = None,
          allocation: str = "uniform", owl_m: float = 5.0, owl_lambda: float = 0.08, dtype: str = "auto",
          device: str | None = None, offload_activations: bool = False, output: str | Path | None = None,
          overwrite: bool = False, progress: bool = True, **options) -> tuple[nn.Module, PruneResult]:
    """Prune a model layer by layer, as `sparse-expansion prune` does.

    Args:
        model: a transformers causal LM (pruned in place), or a reference the CLI takes (a folder,
            a hub id, a .gguf file, "smollm2" or "gemma3"), loaded in `dtype` on the CPU.
        method: "sparsegpt" (the default, as on the command line), "sparse-expansion", "wanda",
            "magnitude" or a registered method.
        sparsity: the fraction of weights zeroed (0.5) or an N:M pattern ("2:4").
        calib: a source name or path ("wiki", "sotu", a .txt file or folder, "wikitext2", "c4"),
            from which `nsamples` windows of `seqlen` tokens are drawn with `seed` (needs the
            tokenizer, found from a reference); or token ids [N, L] (int64) used as they are.
        tokenizer: the tokenizer for a text `calib` when `model` is a model object.
        bits: also quantize the kept weights to this many bits (SparseGPT-based methods).
        targets: "ffn" (the FFN linears) or "all" (attention projections too).
        batch_size: calibration windows per forward pass.
        sequential: give each group of linears its own pass over the block's inputs.
        blocks: (start, end) or "start:end": prune decoder blocks start..end-1 only.
        max_memory: bytes the solver may use on the device; None: what the device has.
        allocation: "uniform" (every block at `sparsity`) or "owl" (per-block rates within
            ±owl_lambda of it, from the blocks' outlier ratios at threshold `owl_m`).
        dtype: the dtype a model reference is loaded in ("auto": the checkpoint's own).
        device: where each decoder block is calibrated and pruned (the model stays where it is);
            None: where the model is.
        offload_activations: keep the calibration activations on the CPU between blocks.
        output: also save the pruned model to this folder as `save` does, writing each finished
            block's experts to it and releasing them (the command line's host memory): the
            returned model then reads its experts from the folder while they run.
        overwrite: replace an existing `output`.
        progress: show a progress bar per block.
        **options: the method's own settings by name (e.g. clusters=16 for sparse-expansion,
            percdamp=0.01 for sparsegpt); an unknown one is refused.

    Returns:
        (model, result): the pruned model and the run's `PruneResult` (per-layer reports;
        `result.config` holds the run's settings as a dict).

    Raises:
        UsageError: a bad argument, named with the fix, before any work is done.
    """
    blocks = _block_range(blocks)
    for value, name in ((nsamples, "nsamples"), (seqlen, "seqlen")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name}={value!r}: give a positive integer")
    config = PruneConfig(method, sparsity, bits=bits, targets=targets, batch_size=batch_size, sequential=sequential,
                         blocks=blocks, seed=seed, max_memory=max_memory, allocation=allocation, owl_m=owl_m,
                         owl_lambda=owl_lambda, options=options or None)
    if device is not None:
        checks.device(str(device))
    if output is not None:
        check_output(str(output), overwrite)
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
        calibration = calibration_windows(tokenizer, calib, nsamples, seqlen, seed)  # checks the source
    if output is None:
        result = prune_model(model, calibration, config, progress=progress, device=device,
                             offload_activations=offload_activations)
        result.config = config.as_dict()
        return model, result
    partial, blocks = PartialOutput(str(output), overwrite), family_of(model).blocks
    try:
        result = prune_model(model, calibration, config, progress=progress, device=device,
                             offload_activations=offload_activations,
                             spill=lambda b: spill_block(model, f"{blocks}.{b}", partial.folder,
                                                         f"experts-{b:05d}.safetensors"))
        result.config = config.as_dict()
        folder = _save(model, output, tokenizer, result, overwrite, partial=partial)
    finally:
        partial.discard()
    read_spilled_lazily(model, folder)
    return model, result


def _block_range(blocks) -> tuple[int, int] | None:
    """`blocks` as (start, end), from a pair or from "start:end" as the command line writes it."""
    if blocks is None:
        return None
    pair = blocks.split(":") if isinstance(blocks, str) else tuple(blocks)
    try:
        pair = tuple(int(b) if isinstance(blocks, str) else b for b in pair)
    except ValueError:
        pair = ()
    if len(pair) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in pair):
        raise UsageError(f"blocks={blocks!r}: give (start, end) or 'start:end', e.g. (0, 8) or '0:8'")
    return pair


def save(model: nn.Module, output: str | Path, tokenizer=None, result: PruneResult | None = None,
         overwrite: bool = False, weight_format: str = "auto") -> Path:
    """Write a pruned model as a folder that `load` and transformers' Auto classes read.

    Args:
        model: the model `prune` returned (with its routed experts, if any).
        output: the folder to write; written atomically (a partial folder is renamed at the end).
        tokenizer: saved beside the model when given.
        result: the run's `PruneResult`; its reports go to sparse_expansion.json.
        overwrite: replace an existing folder.
        weight_format: 'auto' (compressed-tensors integer weights for a model pruned with `bits`,
            dense otherwise), 'dense' or 'compressed-tensors'.

    Returns:
        The folder written.
    """
    return _save(model, output, tokenizer, result, overwrite, weight_format)


def _save(model: nn.Module, output: str | Path, tokenizer, result: PruneResult | None, overwrite: bool,
          weight_format: str = "auto", partial: PartialOutput | None = None) -> Path:
    """`save`, completing a `partial` folder that already holds spilled experts when given."""
    metadata = {"command": "api"}
    if result is not None:
        metadata.update(config=result.config, **result.to_dict())
    return save_pruned_model(model, tokenizer, str(output), metadata, overwrite=overwrite,
                             weight_format=weight_format, partial=partial)


def load(reference: str | Path, device: str = "cpu", dtype: str = "auto", lazy: bool = False
         ) -> tuple[nn.Module, object]:
    """Load a model and its tokenizer.

    Args:
        reference: a folder written by `save` or `prune`, or any reference the CLI takes.
        device: where the model is placed.
        dtype: "auto" (the checkpoint's own), or a dtype name such as "bfloat16".
        lazy: leave a Sparse Expansion folder's experts in their files and read each linear's
            while it runs: host memory for the dense model and one linear's experts, at the cost of
            a read per call (for scoring; generating token by token wants them in memory).

    Returns:
        (model, tokenizer); a folder with routed experts gives the base architecture with
        `SparseExpertLinear` modules in place of its pruned linears.
    """
    reference = str(reference)
    return load_model(reference, model_dtype(reference, dtype), device, lazy=lazy)


__all__ = ["prune", "save", "load", "load_tokenizer"]
