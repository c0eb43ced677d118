"""Sparse Expansion folders as transformers models: importing `sparse_expansion` registers the
`sparse_expansion` model type (model_type.py) with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained(folder)` rebuilds the base architecture with its routed
experts (through `outputs.load_pruned_model`). No code is ever executed from a model folder (no
`trust_remote_code`): the package must be imported in the process that loads.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .errors import UsageError
from .model_type import LOADER, MODEL_TYPE, SparseExpansionConfig
from .outputs import load_pruned_model

# from_pretrained arguments the loader accepts at these values only, besides None (what lm-eval
# and pipelines pass by default); anything else is refused rather than ignored
NEUTRAL = {"revision": ("main",), "trust_remote_code": (False, True), "subfolder": ("",),
           "low_cpu_mem_usage": (True, False), "local_files_only": (True, False), "_from_auto": (True, False),
           "use_safetensors": (True,)}


def _device(device_map) -> str:
    """The one device a `device_map` names (the experts' model is not split across devices)."""
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if device_map is None or device_map == "auto":
        return "cuda" if device_map == "auto" and torch.cuda.is_available() else "cpu"
    if isinstance(device_map, (int, str, torch.device)):
        return f"cuda:{device_map}" if isinstance(device_map, int) else str(device_map)
    raise UsageError(f"device_map={device_map!r}: a Sparse Expansion model loads on one device; give one "
                     f"(e.g. 'cuda:0', 'cpu' or 'auto')")


def _dtype(value) -> torch.dtype | None:
    if value is None or value == "auto":
        return None
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"dtype={value!r}: give a torch dtype, its name or 'auto'")
    return dtype


class SparseExpansionForCausalLM(PreTrainedModel):
    """The Auto classes' entry for `sparse_expansion` folders: `from_pretrained` returns the base
    architecture's model (e.g. LlamaForCausalLM) with its routed experts. Not built directly."""
    config_class = SparseExpansionConfig

    def __init__(self, config, *args, **kwargs):
        raise TypeError("a Sparse Expansion model comes from a folder written by prune: use "
                        "AutoModelForCausalLM.from_pretrained(folder) or sparse_expansion.load_pruned(folder)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, dtype=None, torch_dtype=None,
                        device_map=None, **kwargs):
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise UsageError(f"{pretrained_model_name_or_path}: Sparse Expansion models load from a local folder")
        refused = {k: v for k, v in kwargs.items() if v is not None and v not in NEUTRAL.get(k, ())}
        if model_args or refused:
            raise UsageError(f"{folder}: a Sparse Expansion model does not take {sorted(refused) or model_args}; "
                             f"it takes dtype and device_map")
        dtype = _dtype(dtype if dtype is not None else torch_dtype)
        model = load_pruned_model(folder, device=_device(device_map), dtype=dtype)  # the tokenizer is not ours
        model.config.use_cache = True  # load_pruned's models are for scoring; this one may generate
        return model


assert SparseExpansionForCausalLM.__name__ == LOADER
AutoConfig.register(MODEL_TYPE, SparseExpansionConfig, exist_ok=True)
AutoModelForCausalLM.register(SparseExpansionConfig, SparseExpansionForCausalLM, exist_ok=True)
