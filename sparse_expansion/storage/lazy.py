"""Experts that stay in their files: a loaded Sparse Expansion folder whose routed linears are read
from disk each time they run, so that evaluating it needs the host memory of the dense model and
one linear's experts, not the whole folder's (a Llama-2-7B SE16 folder is 77 GiB).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..methods.expansion.experts import SparseExpertLinear
from ..methods.expansion.router import Router


class LazyExperts(nn.Module):
    """Stands in for the `SparseExpertLinear` `name` of a saved folder. Each call reads its router
    and its experts from `path` (safetensors reads only those tensors; the page cache serves the
    repeats), runs them where the model is (a buffer follows `.to()`), and lets them go: a read
    per call against memory for one linear's experts at a time. Generating token by token would
    pay that read per token: load such a model with its experts in memory instead."""

    def __init__(self, path: Path, name: str, layer: dict, runtime_format: str, like: torch.Tensor):
        super().__init__()
        self.path, self.name, self.router_id = Path(path), name, layer["router"]
        self.in_features, self.out_features, self.experts = layer["in_features"], layer["out_features"], \
            layer["experts"]
        self.runtime_format = runtime_format
        # the device and dtype of the experts' values: those of `like`, then of the model's moves
        self.register_buffer("anchor", torch.empty(0, dtype=like.dtype, device=like.device), persistent=False)

    def materialize(self) -> SparseExpertLinear:
        """The linear's experts as the eagerly loaded folder has them, on the model's device."""
        routers, prefix = f"routers.{self.router_id}.", f"{self.name}."
        with safe_open(self.path, framework="pt") as f:
            router = {k[len(routers):]: f.get_tensor(k) for k in f.keys() if k.startswith(routers)}
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        # as the eager loader: values and bias in the model's dtype, the router in fp32
        tensors = {k: v.to(self.anchor.dtype) if k in ("weight.values", "bias") else v for k, v in tensors.items()}
        module = SparseExpertLinear.from_state(Router.from_state(router), tensors, self.runtime_format)
        return module.to(self.anchor.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.materialize()(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.experts}, "
                f"file={self.path.name}")


def install_lazy_experts(model: nn.Module, folder: Path, files: list[dict], runtime_format: str) -> None:
    """Put a `LazyExperts` in place of every routed linear that `files` (the metadata's entries)
    describe, with the device and dtype of the linear it replaces."""
    for entry in files:
        for name, layer in entry["layers"].items():
            like = next(model.get_submodule(name).parameters())
            model.set_submodule(name, LazyExperts(folder / entry["file"], name, layer, runtime_format, like))
