"""The `analyze` subcommand: its arguments (registered by the CLI) and its entry point."""
from __future__ import annotations

from . import cmd_analyze  # noqa: F401


def add_analyze_parser(sub) -> None:
    an = sub.add_parser("analyze", help="neuron analysis: Wasserstein neurons, output distributions, ablation")
    an.add_argument("model", help="model reference as for prune")
    an.add_argument("--experiment", default="all",
                    help="neurons, histograms, clusters, sparsity-sweep, ablation, a comma-separated list, or all")
    an.add_argument("--out", required=True, help="folder for the PNG figures and CSV/JSON tables")
    an.add_argument("--block", type=int, default=None, help="decoder block analysed (default: the middle one)")
    an.add_argument("--linears", default=None,
                    help="comma-separated linears sharing one input (default: the first FFN group, e.g. gate/up_proj)")
    an.add_argument("--sparsity", default="0.9", help="rate of the SparseGPT / Sparse Expansion variants")
    an.add_argument("--clusters", type=int, default=16, help="Sparse Expansion experts of the variants")
    an.add_argument("--cluster-counts", default="1,2,4,8,16", help="cluster counts of the clusters experiment")
    an.add_argument("--pca-factor", type=int, default=32)
    an.add_argument("--kmeans-restarts", type=int, default=10)
    an.add_argument("--top-percent", type=float, default=3.0, help="Wasserstein neurons: top p%% by W1 to N(0,1)")
    an.add_argument("--pairs", type=int, default=50000, help="token pairs of the mapping difficulty")
    an.add_argument("--show", type=int, default=4, help="neurons per linear in the per-neuron figures")
    an.add_argument("--skip-first", type=int, default=1,
                    help="leading positions of each window left out of the output distributions")
    an.add_argument("--calib", default="wiki", help="source: calibration from its train split, held-out from its test")
    an.add_argument("--nsamples", type=int, default=32, help="calibration windows (Hessians, routers)")
    an.add_argument("--seqlen", type=int, default=256)
    an.add_argument("--eval-windows", type=int, default=32, help="held-out windows giving the output distributions")
    an.add_argument("--ablation-sparsity", default="0.9")
    an.add_argument("--ablation-nsamples", type=int, default=16)
    an.add_argument("--ablation-seqlen", type=int, default=512)
    an.add_argument("--ablation-eval-windows", type=int, default=8, help="held-out windows of the perplexities")
    an.add_argument("--random-seeds", type=int, default=1, help="random selections of the ablation")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--batch-size", type=int, default=8)
    an.add_argument("--device", default="auto")
    an.add_argument("--no-plots", action="store_true", help="CSV/JSON only (figures need matplotlib)")
    an.add_argument("--quiet", action="store_true")
