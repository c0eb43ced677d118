"""`SparseExpertLinear`: a drop-in replacement of an nn.Linear (or GPT-2 Conv1D) that routes
every token to one of K sparse experts; and the compressed form experts are stored in (kept
values + bitmask), by module (`state_tensors` / `from_state`) and by model (`pack_experts` /
`unpack_experts`, which store each shared router once). save.py and checkpoint.py only write
and read what these return."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .kernels.routed_matmul import compress_24, decompress_24, routed_matmul, routed_matmul_24
from .router import Router


class SparseExpertLinear(nn.Module):
    """y = x · W_{e(x)}ᵀ + b_{e(x)}, e(x) = router.assign(x), for x of any leading shape.

    weight: [K, out, in] (the experts, zeros where pruned), bias: [K, out] or None. Routers may
    be shared between modules (gate_proj and up_proj of a Llama MLP share one). `to_24()` swaps
    2:4-sparse experts to the compressed format (kept values + 2-bit indices), which the routed
    Triton kernel decodes in registers, reading about half the weight bytes.
    """

    def __init__(self, router: Router, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.shape[0] != router.clusters:
            raise ValueError(f"{weight.shape[0]} experts for a router with {router.clusters} clusters")
        self.router = router
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = weight.shape[2], weight.shape[1]
        self.experts = weight.shape[0]
        self.format = "dense"

    def to_24(self) -> "SparseExpertLinear":
        """Store the experts 2:4-compressed (ValueError if they are not 2:4 sparse)."""
        if self.format == "dense":
            values, meta = compress_24(self.weight.data)
            del self.weight
            self.register_buffer("values", values)
            self.register_buffer("meta", meta)
            self.format = "2:4"
        return self

    def dense_weight(self) -> torch.Tensor:
        """The experts as [K, out, in], whatever the storage format."""
        return self.weight if self.format == "dense" else decompress_24(self.values, self.meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        expert = self.router.assign(flat)
        if self.format == "dense":
            y = routed_matmul(flat.to(self.weight.dtype), expert, self.weight, self.bias)
        else:
            y = routed_matmul_24(flat.to(self.values.dtype), expert, self.values, self.meta, self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The experts compressed ('weight.values', 'weight.mask', 'weight.shape') and the bias, on the CPU."""
        tensors = {f"weight.{key}": part for key, part in compress(self.dense_weight().detach().cpu()).items()}
        if self.bias is not None:
            tensors["bias"] = self.bias.detach().cpu().contiguous()
        return tensors

    @classmethod
    def from_state(cls, router: Router, tensors: dict[str, torch.Tensor], runtime_format: str = "dense"
                   ) -> "SparseExpertLinear":
        weight = decompress({k: tensors[f"weight.{k}"] for k in ("values", "mask", "shape")})
        module = cls(router, weight, tensors.get("bias"))
        return module.to_24() if runtime_format == "2:4" else module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.experts}, "
                f"format={self.format}")


# ---- compressed storage: kept values + a bitmask -------------------------------------------------

def compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """{'values': nonzeros in row-major order, 'mask': packed bits (uint8), 'shape': int64 shape}."""
    mask = weight != 0
    packed = np.packbits(mask.flatten().cpu().numpy())
    return {"values": weight[mask].contiguous(), "mask": torch.from_numpy(packed),
            "shape": torch.tensor(list(weight.shape), dtype=torch.int64)}


def decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    shape = tuple(parts["shape"].tolist())
    numel = int(np.prod(shape))
    bits = np.unpackbits(parts["mask"].numpy(), count=numel).astype(bool)
    mask = torch.from_numpy(bits)
    if int(mask.sum()) != parts["values"].numel():
        raise ValueError(f"mask keeps {int(mask.sum())} weights but {parts['values'].numel()} values are stored")
    dense = torch.zeros(numel, dtype=parts["values"].dtype)
    dense[mask] = parts["values"]
    return dense.view(shape)


def pack_experts(experts: dict[str, SparseExpertLinear]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, layout) of expert modules keyed by name: '{name}.{state key}' for each module,
    'routers.{i}.{key}' for each distinct router (shared ones once); layout[name] names the router."""
    tensors, layout, routers = {}, {}, {}
    for name, module in experts.items():
        if id(module.router) not in routers:
            routers[id(module.router)] = len(routers)
            rid = routers[id(module.router)]
            tensors.update({f"routers.{rid}.{k}": v for k, v in module.router.state_tensors().items()})
        tensors.update({f"{name}.{k}": v for k, v in module.state_tensors().items()})
        layout[name] = {"router": routers[id(module.router)], "experts": module.experts,
                        "in_features": module.in_features, "out_features": module.out_features}
    return tensors, layout


def unpack_experts(root: nn.Module, tensors: dict[str, torch.Tensor], layout: dict, runtime_format: str = "dense"
                   ) -> None:
    """Put the modules described by `pack_experts`' (tensors, layout) into `root`, each on the
    device of the module it replaces."""
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    routers: dict[int, Router] = {}
    for name, layer in layout.items():
        rid = layer["router"]
        if rid not in routers:
            routers[rid] = Router.from_state(part(f"routers.{rid}."))
        module = SparseExpertLinear.from_state(routers[rid], part(f"{name}."), runtime_format)
        device = next(root.get_submodule(name).parameters()).device
        root.set_submodule(name, module.to(device))
