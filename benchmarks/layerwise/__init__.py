"""Layer-wise benchmark: the cost and quality of pruning one FFN linear with SparseGPT (1 cluster)
and Sparse Expansion (16 clusters), stage by stage, against a one-cluster-at-a-time reference.

    python -m benchmarks.layerwise --quick                   # CPU, scaled-down shapes, minutes
    python -m benchmarks.layerwise --device cuda --full      # Llama-2 shapes, 128x2048 tokens
    python -m benchmarks.layerwise --inputs smollm2 --layer 14   # inputs captured from SmolLM2

(run from the repository root). Sparse Expansion's settings are the driver's: --clusters,
--pca-factor, --kmeans-restarts, --small-clusters, --shrink-tokens, ... (ExpansionOptions).

What runs is the library code the driver runs: its stage functions called in order with a timer
around each (stages.py; tests/test_layerwise.py checks that they give ExpansionMethod's and
SparseGPTMethod's results):
  router   expansion.fit_group_router: PCA + k-means on the calibration tokens (SE only)
  hessian  kernels.hessian.accumulate_hessian batch by batch (SE: with the router's labels, then
           the layer's Hessian and solve_hessians, the small-cluster rule; SparseGPT: HessianStats)
  inverse  solvers.inverse_hessian_factor on all clusters at once
  obs      expansion.solve_experts: batched SparseGPT on all clusters' copies of W
The reference (reference.py) does the same computation one cluster at a time, as SparseGPT's own
code does for a single matrix: textbook PCA and Lloyd's k-means, then for each cluster in turn
its masked Hessian, its inverse factor and its OBS pass with the torch reference. Each stage
reports reference / library time. `--no-reference` skips it (e.g. for a short GPU session).

On CPU both sides run torch code (the library's Triton kernels need CUDA), so the ratios there
measure what batching the clusters saves, not the kernels.

Also measured: peak memory of each pipeline above its start (CUDA max allocated; on CPU the peak
RSS, reset through /proc/self/clear_refs: sparse_expansion.memory.PeakMemory(reset_rss=True)),
relative reconstruction error ‖WX − ŴX‖²/‖WX‖² on HELD-OUT tokens of the same distribution
(Sparse Expansion: tokens routed by its router) for magnitude, Wanda, SparseGPT and Sparse
Expansion, and routed inference (SparseExpertLinear forward, including routing; 2:4 experts
compressed by SparseExpertLinear.to_24) against a dense nn.Linear of the same shape at 1, 16,
256 and 4096 tokens.

Targets (printed as pass/fail, never asserted):
  CPU --quick  Sparse Expansion (16 clusters) >= 2x faster than the reference, same error
  GPU 7B       one FFN linear into 16 experts < 10 s end to end
  inference    routed forward <= 1.2x the dense nn.Linear time at 4096 tokens
Results: tables on stdout, JSON and CSV (benchmarks/results/layerwise_<cpu|gpu>.json/.csv),
PNG plots when matplotlib is installed.

Modules: config (settings, CLI), inputs, stages (library pipeline), reference, measure (timers,
memory), evaluate (held-out error, inference), layer (one layer), report, plots, run.
"""
