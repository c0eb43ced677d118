"""Neuron-level analysis (the paper's §3-4): Wasserstein neurons, output distributions under
pruning, mapping difficulty, and targeted ablation.

A *neuron* is one output row of an FFN linear (default: gate_proj and up_proj of a Llama MLP);
its *output* over a set of tokens is its pre-activation y_t = w·x_t (+ b), outputs being
[T tokens, M neurons]. Everything here only reads the model; the pruned layers are copies.

Modules:
  metrics     the maths: standardize, w1_to_gaussian (exact W1 to N(0, 1)), w1_between,
              mapping_difficulty, pearson, spearman, top_count
  common      AnalysisConfig, the analysed layer (LayerAnalysis, analyze_layer), the linears'
              inputs (capture_linear_inputs, on the driver's block-input capture), output files
  neurons, histograms, clusters, sweep, ablation
              one experiment each; each writes CSV/JSON tables (and PNG figures with matplotlib)
              under an output folder and returns a summary dict
  command     the `analyze` subcommand: its arguments and checks, `run_experiments`

Data protocol: routers and Hessians come from calibration windows (train split); the output
distributions, distances and mapping difficulty are measured on held-out evaluation windows
(test split), leaving out the first `skip_first` positions of every window (position 0 is the
attention-sink token, whose hidden state is an outlier shared by every window).
"""
from __future__ import annotations

from .ablation import SELECTIONS, experiment_ablation
from .clusters import experiment_clusters
from .command import EXPERIMENTS, check_analyze_args, cmd_analyze, parse_experiments, run_experiments
from .common import (AnalysisConfig, LayerAnalysis, analyze_layer, capture_linear_inputs, matplotlib_available,
                     resolve_block, resolve_linears)
from .histograms import experiment_histograms
from .metrics import mapping_difficulty, pearson, spearman, standardize, top_count, w1_between, w1_to_gaussian
from .neurons import experiment_neurons
from .sweep import experiment_sparsity_sweep

__all__ = ["AnalysisConfig", "LayerAnalysis", "analyze_layer", "capture_linear_inputs", "matplotlib_available",
           "resolve_block", "resolve_linears",
           "standardize", "w1_to_gaussian", "w1_between", "mapping_difficulty", "pearson", "spearman", "top_count",
           "EXPERIMENTS", "SELECTIONS", "experiment_neurons", "experiment_histograms", "experiment_clusters",
           "experiment_sparsity_sweep", "experiment_ablation",
           "parse_experiments", "run_experiments", "check_analyze_args", "cmd_analyze"]
