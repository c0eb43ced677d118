"""Compute kernels of sparse-expansion, installed as `sparse_expansion.kernels`.

Each op has a plain-torch reference and (where written) a Triton kernel with the same
signature. `use_triton(tensor)` decides which one the driver runs:
    SPARSE_EXPANSION_KERNELS=auto   (default) Triton on CUDA tensors, torch elsewhere
    SPARSE_EXPANSION_KERNELS=torch  always the torch reference
    SPARSE_EXPANSION_KERNELS=triton always Triton (on CPU only under TRITON_INTERPRET=1)
"""
from .backend import use_triton

__all__ = ["use_triton"]
