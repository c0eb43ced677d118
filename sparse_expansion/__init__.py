"""sparse-expansion: one-shot pruning of transformer language models.

Sparse Expansion (Sawmya et al., ICLR 2025) and the baselines it is judged against
(SparseGPT, Wanda, magnitude), driven layer by layer over a model's decoder blocks.

Importing the package is cheap: the API loads on first use, and Sparse Expansion folders are
registered with transformers' Auto classes as soon as transformers loads them (imports.py).
"""
import importlib

from . import imports
from .version import __version__

imports.install()

_API = {"prune": "api", "save": "api", "load": "api", "load_tokenizer": "api", "PruneConfig": "config"}


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    elif name in imports.MOVED:
        value = imports.moved_module(name)
    elif name == "hf":
        value = importlib.import_module(".storage.hf", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = ["__version__", "hf", "prune", "save", "load", "load_tokenizer", "PruneConfig"]
