"""Sparse Expansion (Sawmya et al., ICLR 2025): one SparseGPT expert per input cluster, routed per token.

    method.py   the `sparse-expansion` Method: collects each group's statistics, solves, swaps modules in
    stages.py   the steps as plain tensor functions: cluster Hessians, PCA, the small-cluster rules, costs
    router.py   PCA + k-means routers (torch Lloyd, or cuML on a GPU) and their fitting
    experts.py  `SparseExpertLinear`: the drop-in routed module, its compressed formats and their packing
"""
from .method import ClusterStats, ExpansionMethod, ExpansionOptions

__all__ = ["ClusterStats", "ExpansionMethod", "ExpansionOptions"]
