"""Choice between the Triton kernels and their torch references."""
import os

import torch

_CHOICES = ("auto", "torch", "triton")


def kernel_mode() -> str:
    mode = os.environ.get("SPARSE_EXPANSION_KERNELS", "auto").lower()
    if mode not in _CHOICES:
        raise ValueError(f"SPARSE_EXPANSION_KERNELS={mode!r}: use one of {', '.join(_CHOICES)}, or unset it")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor `t` should run the Triton kernel."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return t.is_cuda
