"""Writing and reading pruned models.

A pruned model is a transformers folder (safetensors) written atomically. Models with routed
experts also get `experts.safetensors`: every expert weight compressed (kept values + bitmask),
biases, and the routers (PCA mean/basis, centroids), with its sha256 in `sparse_expansion.json`;
the dense part of the model sits in the usual transformers files. `load_pruned` rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .errors import UsageError
from .experts import SparseExpertLinear, pack_experts, unpack_experts
from .faults import fault_point

METADATA = "sparse_expansion.json"
EXPERTS_FILE = "experts.safetensors"
EXPERTS_FORMAT = "bitmask-v1"


def check_output(output: str, overwrite: bool = False) -> None:
    path = Path(output)
    if path.exists() and not overwrite:
        raise UsageError(f"--output {output!r} already exists; choose another folder or pass --overwrite")
    if not path.parent.resolve().exists():
        raise UsageError(f"--output {output!r}: parent folder {str(path.parent)!r} does not exist")


def write_atomically(output: str, write, overwrite: bool = False) -> Path:
    """Call write(tmp_folder), then move the finished folder to `output` in one rename."""
    final = Path(output)
    check_output(output, overwrite)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        fault_point("save")
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in final.parent.glob(f".{final.name}.partial-*"):  # left by runs killed while writing
        if not _alive(stale.name.rsplit("-", 1)[1]):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix == ".safetensors")


def expert_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseExpertLinear)}


def save_pruned_model(model, tokenizer, output: str, metadata: dict, overwrite: bool = False) -> Path:
    """Save model + tokenizer + metadata (arguments, per-layer report) as a transformers folder."""
    experts = expert_layers(model)

    def write(folder: Path) -> None:
        meta = dict(metadata)
        if experts:
            prefixes = tuple(f"{name}." for name in experts)
            dense_part = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
            formats = {m.format for m in experts.values()}
            model.save_pretrained(folder, state_dict=dense_part)
            tensors, layers = pack_experts(experts)
            save_file(tensors, folder / EXPERTS_FILE)
            meta["experts"] = {"format": EXPERTS_FORMAT, "file": EXPERTS_FILE, "layers": layers,
                               "runtime_format": "2:4" if formats == {"2:4"} else "bitmask",
                               "sha256": _sha256(folder / EXPERTS_FILE)}
        else:
            model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        dense_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                          if not n.startswith(tuple(f"{e}." for e in experts)))
        dense_bytes += sum(m.in_features * m.out_features * m.dense_weight().element_size() for m in experts.values())
        meta["saved_bytes"], meta["dense_bytes"] = folder_bytes(folder), dense_bytes
        (folder / METADATA).write_text(json.dumps(meta, indent=1))
    return write_atomically(output, write, overwrite)


def read_metadata(folder: str | Path) -> dict | None:
    path = Path(folder) / METADATA
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UsageError(f"{path} is corrupted (not JSON); re-run prune") from None


def is_expert_folder(folder: str | Path) -> bool:
    meta = read_metadata(folder) if Path(folder).is_dir() else None
    return bool(meta and "experts" in meta)


def load_pruned(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) of a folder written by `prune`, with its routed experts rebuilt."""

    folder = Path(folder)
    meta = read_metadata(folder)
    if meta is None or "experts" not in meta:
        raise UsageError(f"{folder} holds no routed experts ({METADATA} without an 'experts' entry)")
    info = meta["experts"]
    if info.get("format") != EXPERTS_FORMAT:
        raise UsageError(f"{folder}: unknown experts format {info.get('format')!r}; expected {EXPERTS_FORMAT}")
    path = folder / info["file"]
    if not path.exists() or _sha256(path) != info["sha256"]:
        raise UsageError(f"{path} is missing, truncated or corrupted (sha256 differs from {METADATA}); re-run prune")
    try:
        tensors = load_file(path)
    except SafetensorError as e:
        raise UsageError(f"{path} cannot be read ({e}); re-run prune") from None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the expert linears are expected to be missing from the dense part
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto", output_loading_info=True)
    except (OSError, SafetensorError, ValueError) as e:
        raise UsageError(f"{folder}: the dense part cannot be loaded ({e}); re-run prune") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    prefixes = tuple(f"{name}." for name in info["layers"])
    unexpected = [k for k in loading["missing_keys"] if not k.startswith(prefixes)]
    if unexpected:
        raise UsageError(f"{folder}: weights missing from the dense part: {unexpected[:3]}; re-run prune")
    unpack_experts(model, tensors, info["layers"], info.get("runtime_format", "bitmask"))
    model.to(device).eval()
    model.config.use_cache = False
    return model, AutoTokenizer.from_pretrained(folder)
