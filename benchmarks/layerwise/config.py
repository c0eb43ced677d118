"""The benchmark's settings (`BenchConfig`), its presets and its command line."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields, replace

import torch

from sparse_expansion.errors import UsageError
from sparse_expansion.methods import ExpansionOptions

SHAPES = {  # name: (d_in, d_out) of a Llama-2 FFN linear (gate/up_proj and down_proj)
    "7b_up": (4096, 11008), "7b_down": (11008, 4096),
    "13b_up": (5120, 13824), "13b_down": (13824, 5120),
    "70b_up": (8192, 28672), "70b_down": (28672, 8192),
}
STAGES = ("router", "hessian", "inverse", "obs")
TOKEN_COUNTS = (1, 16, 256, 4096)
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


@dataclass
class BenchConfig:
    """What to measure and how; Sparse Expansion's own settings are `expansion` (the driver's
    `ExpansionOptions`: clusters, PCA, k-means, small-cluster rule, damping, blocksize)."""
    device: str = "cpu"
    shapes: tuple[str, ...] = tuple(SHAPES)
    scale: int = 16                 # Llama dimensions divided by this (1 = real shapes)
    inputs: str = "synthetic"       # or "smollm2": inputs of model.model.layers[layer].mlp
    layer: int = 14
    nsamples: int = 64              # calibration windows ...
    seqlen: int = 256               # ... of this many tokens
    batch_windows: int = 8          # windows per accumulation batch (the driver's --batch-size)
    heldout_tokens: int = 4096
    expansion: ExpansionOptions = field(default_factory=ExpansionOptions)
    sparsities: tuple[str, ...] = ("0.5",)
    dtype: str = "float32"          # activations and inference weights (solvers work in fp32)
    reference: bool = True
    reference_pca: str = "svd"      # "svd" (textbook) or "eigh" (the library's algorithm)
    token_counts: tuple[int, ...] = TOKEN_COUNTS
    bench_budget_s: float = 0.5     # timing budget per inference measurement
    repeats: int = 3                # pruning runs shorter than repeat_below_s are repeated ...
    repeat_below_s: float = 1.0     # ... and the fastest kept
    seed: int = 0                   # inputs and k-means (the driver's PruneConfig.seed)
    progress: bool = True
    plots: bool = True
    out: str | None = RESULTS

    @property
    def gpu(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def as_dict(self) -> dict:
        """Flat: the benchmark's fields, then the expansion options."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "expansion"}
        return {**own, **self.expansion.as_dict()}


# --quick divides the dimensions and the calibration tokens by 16: tokens per input dimension (and
# per cluster and dimension) are those of --full, so the per-cluster Hessians are as well-posed
QUICK = dict(scale=16, nsamples=64, seqlen=256, heldout_tokens=4096, sparsities=("0.5", "2:4"))
FULL = dict(scale=1, nsamples=128, seqlen=2048, heldout_tokens=16384, sparsities=("0.5", "2:4"))


def parser(description: str = "") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.layerwise", description=description)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help=f"shapes / 16, {QUICK['nsamples']}x{QUICK['seqlen']} calibration tokens (CPU minutes)")
    mode.add_argument("--full", action="store_true",
                      help=f"real Llama-2 shapes, {FULL['nsamples']}x{FULL['seqlen']} calibration tokens (GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--scale", type=int, help="divide the Llama shapes by this (quick: 16, full: 1)")
    ap.add_argument("--inputs", default="synthetic", choices=("synthetic", "smollm2"))
    ap.add_argument("--layer", type=int, default=14, help="SmolLM2 decoder block (--inputs smollm2)")
    ap.add_argument("--nsamples", type=int)
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--heldout", type=int, help="held-out tokens")
    ap.add_argument("--sparsity", help="comma list (default 0.5,2:4): unstructured rates and N:M patterns")
    ap.add_argument("--dtype", help="activations / inference weights (default fp16 on CUDA, fp32 on CPU)")
    ap.add_argument("--no-reference", action="store_true", help="skip the one-cluster-at-a-time reference")
    ap.add_argument("--reference-pca", choices=("svd", "eigh"),
                    help="reference PCA: textbook SVD (default on CPU) or the covariance eigh (default on "
                         "CUDA, where the SVD of the full calibration set takes minutes)")
    ap.add_argument("--tokens", default=",".join(map(str, TOKEN_COUNTS)), help="inference token counts")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU torch threads (default 1: on a busy small machine OpenMP barriers make "
                         "small multi-threaded ops far slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ExpansionOptions.add_arguments(ap.add_argument_group("Sparse Expansion (the driver's options)"), set())
    return ap


def config_from_args(argv=None, description: str = "") -> BenchConfig:
    """The BenchConfig of a command line (sets the CPU thread count as a side effect)."""
    a = parser(description).parse_args(argv)
    gpu = torch.device(a.device).type == "cuda"
    preset = FULL if a.full else QUICK if a.quick else (FULL if gpu else QUICK)
    try:
        options = ExpansionOptions.from_args(a)
    except UsageError as e:
        raise SystemExit(str(e))
    cfg = BenchConfig(device=a.device, shapes=tuple(s for s in a.shapes.split(",") if s),
                      inputs=a.inputs, layer=a.layer, expansion=options,
                      dtype=a.dtype or ("float16" if gpu else "float32"), reference=not a.no_reference,
                      reference_pca=a.reference_pca or ("eigh" if gpu else "svd"),
                      token_counts=tuple(int(t) for t in a.tokens.split(",")), seed=a.seed,
                      progress=not a.no_progress, plots=not a.no_plots, out=a.out, **preset)
    for key, val in (("scale", a.scale), ("nsamples", a.nsamples), ("seqlen", a.seqlen),
                     ("heldout_tokens", a.heldout), ("sparsities", a.sparsity and tuple(a.sparsity.split(",")))):
        if val is not None:
            cfg = replace(cfg, **{key: val})
    unknown = [s for s in cfg.shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}")
    if not gpu:
        torch.set_num_threads(a.threads)
    return cfg
