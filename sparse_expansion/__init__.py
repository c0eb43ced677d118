"""sparse-expansion: one-shot pruning of transformer language models.

Sparse Expansion (Sawmya et al., ICLR 2025) and the baselines it is judged against
(SparseGPT, Wanda, magnitude), driven layer by layer over a model's decoder blocks.
"""
__version__ = "0.1.0"
