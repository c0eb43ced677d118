"""sparse-expansion: one-shot pruning of transformer language models.

Sparse Expansion (Sawmya et al., ICLR 2025) and the baselines it is judged against
(SparseGPT, Wanda, magnitude), driven layer by layer over a model's decoder blocks.
"""
import importlib
import sys

from .version import __version__

from .storage import hf  # noqa: E402  (registers Sparse Expansion folders with transformers' Auto classes)
from .api import load, load_tokenizer, prune, save  # noqa: E402
from .config import PruneConfig  # noqa: E402

# Modules that moved when the package was grouped by concern keep their old import paths
# (e.g. `from sparse_expansion.experts import SparseExpertLinear`).
_MOVED = {"experts": "methods.expansion.experts", "router": "methods.expansion.router",
          "expansion": "methods.expansion.stages", **{name: f"storage.{name}" for name in (
              "loading", "outputs", "checkpoint", "card", "model_type", "packing", "packages")}}
for _old, _new in _MOVED.items():
    globals()[_old] = sys.modules[f"{__name__}.{_old}"] = importlib.import_module(f".{_new}", __name__)

__all__ = ["__version__", "hf", "prune", "save", "load", "load_tokenizer", "PruneConfig"]
