"""The `sparse_expansion` model type of a folder with routed experts: its config.json nests the
base model's config under `base_config`, so that transformers without this package refuses the
folder (an unknown model type) instead of loading its dense part with random experts. The config
class registers with AutoConfig as the module loads; hf.py registers the model class.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..errors import UsageError

MODEL_TYPE = "sparse_expansion"
LOADER = "SparseExpansionForCausalLM"  # hf.py's class: what the Auto classes build for this type


class SparseExpansionConfig(PretrainedConfig):
    """config.json of a folder with routed experts: the base model's config in `base_config`."""
    model_type = MODEL_TYPE

    def __init__(self, base_config: dict | None = None, **kwargs):
        self.base_config = dict(base_config or {})
        super().__init__(**kwargs)

    def base(self) -> PretrainedConfig:
        """The base model's config (e.g. a LlamaConfig)."""
        kind = self.base_config.get("model_type")
        if kind not in CONFIG_MAPPING:
            raise UsageError(f"config.json: base model type {kind!r} is not one transformers knows")
        return CONFIG_MAPPING[kind].from_dict(self.base_config)


def wrap_config(folder: Path) -> None:
    """Rewrite folder/config.json (the base model's, as save_pretrained wrote it) as a
    Sparse Expansion config that nests it."""
    base = json.loads((folder / "config.json").read_text())
    SparseExpansionConfig(base_config=base, architectures=[LOADER]).save_pretrained(folder)


def base_config(folder: str | Path) -> PretrainedConfig:
    """The base model's config of a folder: nested in a Sparse Expansion config.json, or the
    config.json itself (folders written before the model type existed)."""
    config = AutoConfig.from_pretrained(folder)
    return config.base() if isinstance(config, SparseExpansionConfig) else config


AutoConfig.register(MODEL_TYPE, SparseExpansionConfig, exist_ok=True)  # see imports.py
