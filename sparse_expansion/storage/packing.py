"""Quantized baselines (`--bits`) saved as compressed-tensors integer weights, the format
llm-compressor writes and transformers and serving engines read.

Each quantized linear keeps the grid it was rounded on (`remember_grid`, at prune time): per
output row, an asymmetric min-max grid scale·(q − zero), q in [0, 2^b − 1]. compressed-tensors
stores signed integers, q − 2^(b−1) and zero − 2^(b−1), with the same scale, so the weights it
decodes are the pruned weights as they were computed. 8 bits: `int-quantized` (an int8 weight);
fewer: `pack-quantized` (b-bit values packed into int32 words). Pruned weights are q = zero,
decoded as exact zeros; compressed-tensors >= 0.15 (what transformers 5 requires) has no sparse
format, so the sparsity is not exploited by the storage.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError, option, setting

GRID = "quant_grid"  # the attribute a quantized linear carries: (scale [R, 1], zero [R, 1], bits)


def remember_grid(module: nn.Module, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> None:
    setattr(module, GRID, (scale.reshape(-1, 1).float().cpu(), zero.reshape(-1, 1).float().cpu(), bits))


def forget_grid(module: nn.Module) -> None:
    if hasattr(module, GRID):
        delattr(module, GRID)


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, GRID)}


def format_for(bits: int) -> str:
    return "int-quantized" if bits == 8 else "pack-quantized"


def compressed_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with every quantized linear's weight replaced by its compressed-tensors
    tensors, the config.json `quantization_config` block)."""
    import compressed_tensors
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    linears = quantized_linears(model)
    bits = {getattr(m, GRID)[2] for m in linears.values()}
    if len(bits) != 1:
        raise ValueError(f"quantized linears with {sorted(bits)} bits: one width per model")
    b, state = bits.pop(), dict(state)
    fmt, offset = format_for(b), 2 ** (b - 1)
    for name, module in linears.items():
        scale, zero, _ = getattr(module, GRID)
        weight = state.pop(f"{name}.weight").float()
        q = torch.clamp(torch.round(weight / scale) + zero, 0, 2 ** b - 1)
        off_grid = (scale * (q - zero) - weight).abs().max().item() if weight.numel() else 0.0
        if off_grid > 0.01 * scale.max().item():  # more than rounding: not the grid it was quantized on
            raise ValueError(f"{name}: weights lie up to {off_grid:.3g} off their quantization grid")
        q_signed, zero_signed = (q - offset).to(torch.int8), (zero - offset).to(torch.int8)
        state[f"{name}.weight_scale"] = scale.to(module.weight.dtype)
        if fmt == "int-quantized":
            state[f"{name}.weight"], state[f"{name}.weight_zero_point"] = q_signed, zero_signed
        else:
            state[f"{name}.weight_packed"] = pack_to_int32(q_signed, b)
            state[f"{name}.weight_zero_point"] = pack_to_int32(zero_signed, b, packed_dim=0)
            state[f"{name}.weight_shape"] = torch.tensor(list(weight.shape), dtype=torch.int64)
    weights = QuantizationArgs(num_bits=b, type="int", symmetric=False, strategy="channel")
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=sorted(linears), weights=weights,
                                                                             format=fmt)},
                                format=fmt, quantization_status="compressed")
    block = {**config.model_dump(), "quant_method": "compressed-tensors", "version": compressed_tensors.__version__}
    return state, block


def add_quantization_config(folder: Path, block: dict) -> None:
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = block
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def loading_options(folder: str | Path) -> dict:
    """from_pretrained options a compressed-tensors folder needs: transformers 5.24 cannot build
    the packed zero points of an asymmetric pack-quantized model (their shape differs from the
    meta model's), so the weights are decoded to dense at load time instead."""
    path = Path(folder) / "config.json"
    block = json.loads(path.read_text()).get("quantization_config") if path.exists() else None
    if not block or block.get("quant_method") != "compressed-tensors":
        return {}
    if block.get("format") != "pack-quantized":
        return {}
    from transformers import CompressedTensorsConfig
    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


FORMATS = ("auto", "dense", "compressed-tensors")


def check_format(fmt: str, bits: int | None, method: str) -> None:
    """Refuse a --format the run cannot save in ('auto' is resolved at save time: compressed-tensors
    when the model has quantized nn.Linear layers, dense otherwise)."""
    if fmt == "compressed-tensors":
        if method == "sparse-expansion":
            raise UsageError(f"{setting('format', 'compressed-tensors')}: routed experts have their own format; "
                             f"use auto or dense")
        if bits is None:
            raise UsageError(f"{setting('format', 'compressed-tensors')} needs {option('bits')}: "
                             f"compressed-tensors >= 0.15 (which transformers 5 requires) has no sparse formats; "
                             f"sparse weights are saved dense")
