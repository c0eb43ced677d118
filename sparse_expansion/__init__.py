"""sparse-expansion: one-shot pruning of transformer language models.

Sparse Expansion (Sawmya et al., ICLR 2025) and the baselines it is judged against
(SparseGPT, Wanda, magnitude), driven layer by layer over a model's decoder blocks.
"""
from .version import __version__

from . import hf  # noqa: E402  (registers Sparse Expansion folders with transformers' Auto classes)
from .api import load, load_tokenizer, prune, save  # noqa: E402
from .config import PruneConfig  # noqa: E402

__all__ = ["__version__", "hf", "prune", "save", "load", "load_tokenizer", "PruneConfig"]
