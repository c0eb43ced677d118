"""`SparseExpertLinear`: a drop-in replacement of an nn.Linear (or GPT-2 Conv1D) that routes
every token to one of K sparse experts; and the compressed form experts are stored in (kept
values + bitmask), by module (`state_tensors` / `from_state`) and by model (`pack_experts` /
`unpack_experts`, which store each shared router once). storage/outputs.py and storage/checkpoint.py only write
and read what these return."""
from __future__ import annotations

import math

import torch
from torch import nn

from ...kernels.routed_matmul import (bitmask_offsets, compress_24, decompress_24, routed_apply, routed_matmul,
                                    routed_matmul_24, routed_matmul_bitmask)
from .router import Router


class SparseExpertLinear(nn.Module):
    """A drop-in routed Linear: y = x · W_{e(x)}ᵀ + b_{e(x)}, e(x) = router.assign(x), for x of
    any leading shape [..., in] (output [..., out] in the experts' dtype).

    Args:
        router: the PCA + k-means `Router` that picks each token's expert; routers may be shared
            between modules (gate_proj and up_proj of a Llama MLP share one).
        weight: the K experts [K, out, in] (zeros where pruned), or their `compress` parts.
        bias: [K, out] or None.

    The experts are stored in one of three formats (`format`):
      bitmask  (default) the kept values and a bitmask; on a GPU the routed Triton kernel decodes
               them tile by tile in registers (in_features a multiple of 8, as in every LLM);
               elsewhere the forward decompresses one expert at a time, only while its tokens
               are multiplied, so K dense copies never exist
      2:4      `to_24()`: kept values + 2-bit indices, decoded in registers by the routed Triton
               kernel (about half the weight bytes)
      dense    `to_dense()`: [K, out, in], the routed Triton kernel's plain path
    """

    def __init__(self, router: Router, weight: torch.Tensor | dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None):
        super().__init__()
        parts = weight if isinstance(weight, dict) else compress(weight)
        self.experts, self.out_features, self.in_features = (int(n) for n in parts["shape"].tolist())
        if self.experts != router.clusters:
            raise ValueError(f"{self.experts} experts for a router with {router.clusters} clusters")
        self.router = router
        self.register_buffer("values", parts["values"].contiguous())
        self.register_buffer("mask", parts["mask"].to(torch.uint8).contiguous())
        bits = self.experts * self.out_features * self.in_features
        if self.mask.numel() != (bits + 7) // 8:
            raise ValueError(f"the mask has {self.mask.numel()} bytes; {self.experts} experts of "
                             f"{self.out_features} x {self.in_features} need {(bits + 7) // 8}")
        if self.in_features % 8 == 0:  # rows start on whole bytes: the layout the routed kernel reads
            tile_offsets, offsets = bitmask_offsets(self._row_mask())
            self.register_buffer("tile_offsets", tile_offsets, persistent=False)
        else:
            kept = [int(self._expert_mask(e).sum()) for e in range(self.experts)]
            offsets = torch.tensor([0, *kept], dtype=torch.int64).cumsum(0)
        if int(offsets[-1]) != self.values.numel():
            raise ValueError(f"mask keeps {int(offsets[-1])} weights but {self.values.numel()} values are stored")
        self.register_buffer("offsets", offsets, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.format = "bitmask"

    def _row_mask(self) -> torch.Tensor:
        """The bitmask as [K, out, in/8] bytes (in_features a multiple of 8)."""
        return self.mask.view(self.experts, self.out_features, self.in_features // 8)

    def _expert_mask(self, e: int) -> torch.Tensor:
        """Kept-weight mask [out·in] (bool) of expert e, unpacked from its bytes of the bitmask."""
        n = self.out_features * self.in_features
        first, last = e * n, (e + 1) * n
        bits = unpack_bits(self.mask[first // 8:(last + 7) // 8])
        return bits[first % 8:first % 8 + n]

    def expert_weight(self, e: int) -> torch.Tensor:
        """Expert e as a dense [out, in] matrix, whatever the storage format."""
        if self.format == "dense":
            return self.weight[e]
        if self.format == "2:4":
            return decompress_24(self.values[e:e + 1], self.meta[e:e + 1])[0]
        # kept value k of the expert sits at the k-th set bit: gather by the running count of set bits
        # (twice as fast as masked_scatter on a CPU; pruned entries may come out as -0.0)
        kept = self.values[self.offsets[e]:self.offsets[e + 1]]
        if kept.numel() == 0:
            return self.values.new_zeros(self.out_features, self.in_features)
        mask = self._expert_mask(e)
        position = torch.cumsum(mask, 0, dtype=torch.int32).sub_(1).clamp_(min=0)
        return kept.take(position.long()).mul_(mask).view(self.out_features, self.in_features)

    @property
    def weight_dtype(self) -> torch.dtype:
        return (self.weight if self.format == "dense" else self.values).dtype

    def dense_weight(self) -> torch.Tensor:
        """All experts as [K, out, in] (a dense copy unless the format is dense)."""
        if self.format == "dense":
            return self.weight
        if self.format == "2:4":
            return decompress_24(self.values, self.meta)
        return torch.stack([self.expert_weight(e) for e in range(self.experts)])

    def _store(self, fmt: str, **tensors: torch.Tensor) -> "SparseExpertLinear":
        for name in ("weight", "values", "mask", "meta", "offsets", "tile_offsets"):
            if hasattr(self, name):
                delattr(self, name)
        for name, t in tensors.items():
            if name == "weight":
                self.weight = nn.Parameter(t, requires_grad=False)
            else:
                self.register_buffer(name, t)
        self.format = fmt
        return self

    def to_24(self) -> "SparseExpertLinear":
        """Store the experts 2:4-compressed (ValueError if they are not 2:4 sparse)."""
        if self.format == "2:4":
            return self
        values, meta = compress_24(self.dense_weight().detach())
        return self._store("2:4", values=values, meta=meta)

    def to_dense(self) -> "SparseExpertLinear":
        """Store the experts as one dense [K, out, in] tensor (K dense copies: for speed on a GPU)."""
        return self if self.format == "dense" else self._store("dense", weight=self.dense_weight().detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        expert = self.router.assign(flat)
        if self.format == "dense":
            y = routed_matmul(flat.to(self.weight.dtype), expert, self.weight, self.bias)
        elif self.format == "2:4":
            y = routed_matmul_24(flat.to(self.values.dtype), expert, self.values, self.meta, self.bias)
        elif self.in_features % 8 == 0:
            y = routed_matmul_bitmask(flat.to(self.values.dtype), expert, self.values, self._row_mask(),
                                      self.tile_offsets, self.offsets, self.bias)
        else:
            def apply(e, xe):
                y = xe @ self.expert_weight(e).t()
                return y if self.bias is None else y + self.bias[e]
            y = routed_apply(flat.to(self.values.dtype), expert, self.experts, self.out_features, apply)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The experts compressed ('weight.values', 'weight.mask', 'weight.shape') and the bias, on the CPU."""
        if self.format == "bitmask":
            parts = {"values": self.values, "mask": self.mask,
                     "shape": torch.tensor([self.experts, self.out_features, self.in_features])}
        else:
            parts = compress(self.dense_weight().detach())
        tensors = {f"weight.{key}": part.detach().cpu().contiguous() for key, part in parts.items()}
        if self.bias is not None:
            tensors["bias"] = self.bias.detach().cpu().contiguous()
        return tensors

    @classmethod
    def from_state(cls, router: Router, tensors: dict[str, torch.Tensor], runtime_format: str = "bitmask"
                   ) -> "SparseExpertLinear":
        module = cls(router, {k: tensors[f"weight.{k}"] for k in ("values", "mask", "shape")}, tensors.get("bias"))
        return module.to_24() if runtime_format == "2:4" else module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.experts}, "
                f"format={self.format}")


# ---- compressed storage: kept values + a bitmask -------------------------------------------------

_BIT_MASKS = (2 ** torch.arange(7, -1, -1)).to(torch.uint8)  # big-endian within a byte, as numpy.packbits


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool [n] -> uint8 [ceil(n/8)], first element in the highest bit (numpy.packbits' layout)."""
    flat = mask.flatten()
    if mask.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(-mask.numel() % 8)])
    packed = torch.zeros(flat.numel() // 8, dtype=torch.uint8, device=mask.device)
    for i in range(8):  # bit by bit: transients of n/8 bytes, not n words
        packed |= flat[i::8].to(torch.uint8) << (7 - i)
    return packed


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [m] -> bool [8m], the inverse of `pack_bits` (on the tensor's device)."""
    return (packed[:, None] & _BIT_MASKS.to(packed.device)).bool().flatten()


def compress(weight: torch.Tensor, exact: bool = False) -> dict[str, torch.Tensor]:
    """{'values': nonzeros in row-major order, 'mask': packed bits (uint8), 'shape': int64 shape}.
    `exact`: -0.0 counts as a value, so that `decompress` gives the same bits back."""
    mask = weight != 0
    if exact:
        mask |= torch.signbit(weight)
    return {"values": weight.reshape(-1)[mask.reshape(-1)], "mask": pack_bits(mask),
            "shape": torch.tensor(list(weight.shape), dtype=torch.int64)}


def decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    shape = tuple(parts["shape"].tolist())
    numel = math.prod(shape)
    mask = unpack_bits(parts["mask"])[:numel]
    if int(mask.sum()) != parts["values"].numel():
        raise ValueError(f"mask keeps {int(mask.sum())} weights but {parts['values'].numel()} values are stored")
    return parts["values"].new_zeros(numel).masked_scatter_(mask, parts["values"]).view(shape)


def concat_compressed(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The `compress` form of the experts of several `compress` parts [K_i, R, C], stacked in order."""
    shapes = [tuple(p["shape"].tolist()) for p in parts]
    numel = [math.prod(s) for s in shapes]
    if all(n % 8 == 0 for n in numel):  # byte-aligned: the packed bits concatenate as they are
        mask = torch.cat([p["mask"] for p in parts])
    else:
        mask = pack_bits(torch.cat([unpack_bits(p["mask"])[:n] for p, n in zip(parts, numel)]))
    return {"values": torch.cat([p["values"] for p in parts]), "mask": mask,
            "shape": torch.tensor([sum(s[0] for s in shapes), *shapes[0][1:]], dtype=torch.int64)}


def convert_experts(model: nn.Module, fmt: str) -> int:
    """Store every SparseExpertLinear of `model` as `fmt` ('dense' or '2:4'); returns how many."""
    if fmt not in ("dense", "2:4"):
        raise ValueError(f"experts format {fmt!r}: use 'dense' or '2:4'")
    modules = [m for m in model.modules() if isinstance(m, SparseExpertLinear)]
    for module in modules:
        module.to_dense() if fmt == "dense" else module.to_24()
    return len(modules)


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


def unpack_experts(root: nn.Module, tensors: dict[str, torch.Tensor], layout: dict, runtime_format: str = "bitmask"
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
