"""Model structure: families, decoder blocks, FFN / attention linears, block-input capture.

Loading a model from a reference (hub id, folder, .gguf, `smollm2`) lives in storage/loading.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError, setting


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
    raise UsageError(f"{setting('targets', targets)}: use ffn or all")


# ---- weights of nn.Linear and GPT-2's Conv1D, as [out, in] -------------------------------------

def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a view for nn.Linear, a transpose for Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    weight = weight.to(module.weight.dtype)
    module.weight.data.copy_(weight.t() if is_conv1d(module) else weight)


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
def capture_block_inputs(model: nn.Module, batches: list[torch.Tensor], store_device=None, device=None
                         ) -> list[tuple[torch.Tensor, tuple, dict]]:
    """Inputs of the first decoder block for each batch of token ids [B, L]: (hidden, args, kwargs).

    Every argument the model passes (masks, position embeddings, cache positions) is kept as
    is, so that the blocks can be re-run on their own with `block(hidden, *args, **kwargs)`. With a
    `store_device` (e.g. "cpu") they are kept there as they are captured (`move` them back to run).
    The token ids go to `device` (default: the model's first parameter's), where the modules
    before the first block must be (`move_outside_blocks`).
    """
    blocks = decoder_blocks(model)
    catcher = _Catcher(blocks[0], store_device)
    blocks[0] = catcher
    device = device or next(model.parameters()).device
    try:
        for ids in batches:
            try:
                model(ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        blocks[0] = catcher.block
    return catcher.calls


def move_outside_blocks(model: nn.Module, device) -> None:
    """Move every parameter and buffer that is not inside a decoder block (embeddings, rotary
    tables, final norm, LM head) to `device`; the blocks stay where they are."""
    inside = {id(t) for block in decoder_blocks(model) for t in (*block.parameters(), *block.buffers())}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and id(param) not in inside:
                param.data = param.data.to(device)
        for name, buf in module._buffers.items():
            if buf is not None and id(buf) not in inside:
                module._buffers[name] = buf.to(device)


def onload_blocks(model: nn.Module, device) -> None:
    """Run `model` (on the CPU) on `device` one decoder block at a time: what lies outside the
    blocks moves there, and each block visits it only while it runs (forward hooks), so that the
    device holds that and one block, not the model: evaluating a model larger than the GPU."""
    def arrive(module, args) -> None:  # a hook that returns something replaces the block's inputs
        module.to(device)

    def leave(module, args, out) -> None:
        module.to("cpu")
    move_outside_blocks(model, device)
    for block in decoder_blocks(model):
        block.register_forward_pre_hook(arrive)
        block.register_forward_hook(leave)


def scoring_bytes(model: nn.Module, batch: int, seqlen: int) -> int:
    """Device memory to score `batch` windows of `seqlen` tokens with `model` placed whole: its
    weights and buffers, the batch's logits and one window's fp32 log-softmax, and 10% besides."""
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    vocab, element = model.config.vocab_size, next(model.parameters()).element_size()
    return int(1.1 * (held + (batch * element + 4) * seqlen * vocab))


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
