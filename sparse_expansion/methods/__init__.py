"""Pruning methods and their registry: name -> `Method` subclass.

Adding a method is one module here (a `Method` subclass with its `Options`) and one line in
`METHODS`; `register` adds one from outside the package (a plugin, a test).
"""
from __future__ import annotations

from ..errors import UsageError
from .base import HessianStats, Method, MethodOptions, collect
from .expansion import ClusterStats, ExpansionMethod, ExpansionOptions
from .magnitude import MagnitudeMethod
from .sparsegpt import SparseGPTMethod, SparseGPTOptions
from .wanda import WandaMethod

METHODS: dict[str, type[Method]] = {
    MagnitudeMethod.name: MagnitudeMethod,
    WandaMethod.name: WandaMethod,
    SparseGPTMethod.name: SparseGPTMethod,
    ExpansionMethod.name: ExpansionMethod,
}


def register(cls: type[Method]) -> type[Method]:
    """Add a method to the registry (usable as a class decorator)."""
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "register", "method_class", "Method", "MethodOptions", "HessianStats", "collect",
           "ClusterStats", "ExpansionMethod", "ExpansionOptions", "MagnitudeMethod", "SparseGPTMethod",
           "SparseGPTOptions", "WandaMethod"]
