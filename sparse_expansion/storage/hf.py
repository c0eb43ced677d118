"""Sparse Expansion folders as transformers models: importing `sparse_expansion` registers the
`sparse_expansion` model type (model_type.py) with transformers' Auto classes (imports.py), so that
`AutoModelForCausalLM.from_pretrained(folder)` rebuilds the base architecture with its routed
experts (through `outputs.load_pruned_model`). No code is ever executed from a model folder (no
`trust_remote_code`): the package must be imported in the process that loads.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers.models.auto.modeling_auto import AutoModelForCausalLM

from ..errors import UsageError
from .model_type import LOADER, SparseExpansionConfig

# from_pretrained keywords that say where files come from (hub, cache, revision) or how a dense
# checkpoint is read: a local Sparse Expansion folder has one answer to each, so they are ignored.
# transformers, pipelines and lm-eval pass several of them on every call.
IGNORED = frozenset({"cache_dir", "force_download", "local_files_only", "token", "revision", "proxies",
                     "resume_download", "_from_auto", "_from_pipeline", "_commit_hash", "code_revision",
                     "trust_remote_code", "adapter_kwargs", "use_safetensors", "low_cpu_mem_usage",
                     "weights_only", "user_agent", "offload_folder", "offload_state_dict", "offload_buffers"})
# keywords that would change the loaded model in a way a folder of routed experts cannot honour:
# refused unless left at their default
REFUSED = frozenset({"quantization_config", "load_in_8bit", "load_in_4bit", "gguf_file", "variant", "state_dict",
                     "from_tf", "from_flax", "tp_plan", "tp_size", "device_mesh", "max_memory",
                     "output_loading_info", "adapter_name", "key_mapping"})


def _check_keywords(folder: Path, kwargs: dict) -> None:
    """Refuse the keywords in REFUSED that are set; warn about unknown ones, which are ignored."""
    given = {k: v for k, v in kwargs.items() if v is not None and v is not False and k not in IGNORED}
    refused = sorted(k for k in given if k in REFUSED)
    if refused:
        raise UsageError(f"{folder}: a Sparse Expansion model cannot be loaded with {refused}; it takes dtype, "
                         f"device_map and attn_implementation (load the dense base model for the others)")
    if given:
        warnings.warn(f"{folder}: a Sparse Expansion model ignores {sorted(given)}", stacklevel=3)


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


class SparseExpansionForCausalLM:
    """The Auto classes' entry for `sparse_expansion` folders: `from_pretrained` returns the base
    architecture's model (e.g. LlamaForCausalLM, a PreTrainedModel) with its routed experts. Not
    built directly, so not a PreTrainedModel itself (which would import transformers' modeling
    code while it registers: imports.py)."""
    config_class = SparseExpansionConfig

    def __init__(self, config=None, *args, **kwargs):
        raise TypeError("a Sparse Expansion model comes from a folder written by prune: use "
                        "AutoModelForCausalLM.from_pretrained(folder) or sparse_expansion.load(folder)")

    @classmethod
    def _from_config(cls, config, **kwargs):
        return cls(config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, dtype=None, torch_dtype=None,
                        device_map=None, attn_implementation=None, subfolder="", lazy=False, **kwargs):
        """`lazy=True`: the experts stay in their files and are read each time their linear runs
        (storage/lazy.py: for scoring a model larger than memory; generation reads them per token)."""
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        if not folder.is_dir():
            raise UsageError(f"{folder}: Sparse Expansion models load from a local folder")
        if model_args:
            raise UsageError(f"{folder}: a Sparse Expansion model takes no positional model arguments")
        _check_keywords(folder, kwargs)
        dtype = _dtype(dtype if dtype is not None else torch_dtype)
        if attn_implementation is None and isinstance(config, SparseExpansionConfig):
            attn_implementation = config._attn_implementation  # the Auto classes move it into the config
        from .outputs import load_pruned_model  # transformers' modeling code: not at registration
        model = load_pruned_model(folder, device=_device(device_map), dtype=dtype,  # the tokenizer is not ours
                                  attn_implementation=attn_implementation, lazy=lazy)
        model.config.use_cache = True  # load_pruned's models are for scoring; this one may generate
        return model


assert SparseExpansionForCausalLM.__name__ == LOADER
AutoModelForCausalLM.register(SparseExpansionConfig, SparseExpansionForCausalLM, exist_ok=True)  # see imports.py
