"""What the experiments share: the configuration, the analysed layer and its inputs, output files.

  AnalysisConfig         every knob of the experiments
  capture_linear_inputs  inputs of linears inside decoder blocks, captured the way the pruning
                         driver captures them (first block's inputs, then block by block)
  LayerAnalysis          one block's linears: calibration inputs (Hessians, routers), held-out
                         inputs (output distributions) and pruned copies made with the driver's
                         own methods (SparseGPT, Sparse Expansion, magnitude); `analyze_layer`
                         builds one
  _pyplot, _save, _write_csv, _write_json  figures (when matplotlib is there) and tables
"""
from __future__ import annotations

import copy
import csv
import importlib.util
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..config import PruneConfig
from ..driver import collect_inputs, propagate
from ..errors import UsageError
from ..methods import ExpansionOptions, collect
from ..models import capture_block_inputs, decoder_blocks, family_of, linear_weight
from ..sparsity import Sparsity
from .metrics import top_count, w1_between, w1_to_gaussian


# ---- configuration -----------------------------------------------------------------------------------

@dataclass
class AnalysisConfig:
    block: int | None = None              # analysed decoder block (None: the middle one)
    linears: tuple[str, ...] | None = None  # linears sharing one input (None: the family's first FFN group)
    sparsity: float = 0.9                 # rate of the SparseGPT / Sparse Expansion variants
    clusters: int = 16                    # Sparse Expansion experts
    pca_factor: int = 32
    kmeans_restarts: int = 10
    refine_iterations: int = 0            # re-solve on the mask, for SparseGPT and Sparse Expansion alike
    top_percent: float = 3.0              # Wasserstein neurons: top p% by distance to N(0, 1)
    pairs: int = 50_000                   # token pairs of the mapping difficulty
    show: int = 4                         # neurons per linear in the per-neuron figures
    cluster_counts: tuple[int, ...] = (1, 2, 4, 8, 16)
    sweep_rates: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    ablation_sparsity: float = 0.9
    ablation_random_seeds: int = 1        # random selections drawn (each costs one evaluation)
    skip_first: int = 1                   # leading positions of every window left out of the distributions
    batch_size: int = 8
    seed: int = 0
    plots: bool | None = None             # None: figures when matplotlib is installed
    progress: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


def _log(cfg: AnalysisConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, flush=True)


def resolve_linears(model: nn.Module, linears: tuple[str, ...] | None) -> tuple[str, ...]:
    """The analysed linears: a subset of one FFN input group (they share one captured input)."""
    groups = family_of(model).ffn
    if linears is None:
        return tuple(groups[0])
    for g in groups:
        if set(linears) <= set(g):
            return tuple(linears)
    raise UsageError(f"--linears {','.join(linears)}: give linears of one FFN input group, one of "
                     f"{'; '.join(','.join(g) for g in groups)}")


def resolve_block(model: nn.Module, block: int | None) -> int:
    count = len(decoder_blocks(model))
    if block is None:
        return count // 2
    if not 0 <= block < count:
        raise UsageError(f"--block {block}: the model has blocks 0 to {count - 1}")
    return block


# ---- capturing a linear's inputs ---------------------------------------------------------------------

def _block_index(blocks: nn.ModuleList, module: nn.Module) -> int:
    for b, block in enumerate(blocks):
        if any(m is module for m in block.modules()):
            return b
    raise ValueError(f"{type(module).__name__} is not inside a decoder block of the model")


@torch.no_grad()
def capture_linear_inputs(model: nn.Module, ids: torch.Tensor, modules: list[nn.Module], batch_size: int = 8,
                          keep_positions: torch.Tensor | None = None) -> list[list[torch.Tensor]]:
    """Inputs of each of `modules` (submodules of decoder blocks) over token ids [N, L].

    As the driver does: the first block's inputs for each batch of `batch_size` windows
    (`capture_block_inputs`), then every block up to the last one holding a module runs on them
    (`propagate`, `collect_inputs` for the last), a forward pre-hook on each module recording its input
    (fp32, [B·L', d] per batch, only the positions where `keep_positions` [L] is True); later blocks are not run.
    Returns one list of per-batch tensors per module.
    """
    blocks = decoder_blocks(model)
    owners = [_block_index(blocks, m) for m in modules]
    store: list[list[torch.Tensor]] = [[] for _ in modules]

    def record(k):
        def fn(x):
            if keep_positions is not None:
                x = x[:, keep_positions.to(x.device)]
            store[k].append(x.reshape(-1, x.shape[-1]).float().clone())
        return fn

    device = next(model.parameters()).device
    cached = capture_block_inputs(model, list(ids.split(batch_size)))
    last = max(owners, default=-1)
    for b in range(last + 1):
        hooks = {m: record(k) for k, m in enumerate(modules) if owners[k] == b}
        if b < last:
            cached = propagate(blocks[b], cached, device, hooks)
        else:
            collect_inputs(blocks[b], cached, device, hooks)
    return store


def _kept_positions(seqlen: int, skip_first: int) -> torch.Tensor:
    if skip_first >= seqlen:
        raise UsageError(f"--skip-first {skip_first} leaves no token of a {seqlen}-token window")
    return torch.arange(seqlen) >= skip_first


# ---- one layer's outputs under pruning --------------------------------------------------------------

def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@dataclass
class LayerAnalysis:
    """One block's analysed linears: inputs, dense weights and (cached) pruned copies' outputs.

    calib: per-batch calibration inputs [B·L, d] (every position, as the driver sees them) for
    Hessians and routers; x: held-out inputs [T, d] whose outputs form the distributions.
    """
    model: nn.Module
    block: int
    names: tuple[str, ...]
    calib: list[torch.Tensor]
    x: torch.Tensor
    weights: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor | None]
    config: AnalysisConfig
    reports: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.x.shape[0]

    def dense(self, name: str) -> torch.Tensor:
        """Dense outputs [T, R] on the held-out tokens."""
        key = ("dense", name)
        if key not in self._cache:
            y = self.x @ self.weights[name].t()
            self._cache[key] = y if self.biases[name] is None else y + self.biases[name]
        return self._cache[key]

    def outputs(self, method: str, rate: float, clusters: int | None = None) -> dict[str, torch.Tensor]:
        """Held-out outputs {linear: [T, R]} of a pruned copy of the layer group.

        method: 'sparsegpt', 'magnitude', 'wanda' or 'sparse-expansion' (with `clusters`), pruned
        at `rate` by the driver's own method classes from the calibration inputs.
        """
        if rate == 0.0:
            return {n: self.dense(n) for n in self.names}
        key = (method, float(rate), clusters if method == "sparse-expansion" else None)
        if key not in self._cache:
            cfg = self.config
            options = ({"refine_iterations": cfg.refine_iterations} if method == "sparsegpt" else
                       ExpansionOptions(clusters=clusters or cfg.clusters, pca_factor=cfg.pca_factor,
                                        kmeans_restarts=cfg.kmeans_restarts, refine_iterations=cfg.refine_iterations)
                       if method == "sparse-expansion" else None)
            pc = PruneConfig(method=method, sparsity=Sparsity(float(rate)), seed=cfg.seed, options=options)
            holder = copy.deepcopy(decoder_blocks(self.model)[self.block])
            layers = {n: holder.get_submodule(n) for n in self.names}
            prune = pc.make_method()
            t0 = time.perf_counter()  # Sparse Expansion solves its experts while it collects
            collector = collect(prune, layers, self.calib)
            with torch.no_grad():
                reports = prune.prune_group(holder, layers, collector, f"block{self.block}")
                outs = {n: holder.get_submodule(n)(self.x).float() for n in self.names}
            self.reports[key] = {"seconds": time.perf_counter() - t0,
                                 "layers": [{k: v for k, v in r.to_dict().items() if not k.startswith("seconds")}
                                            for r in reports]}
            self._cache[key] = outs
        return self._cache[key]

    def w1_gaussian(self, name: str, method: str = "dense", rate: float = 0.0, clusters: int | None = None
                    ) -> torch.Tensor:
        key = ("w1g", name, method, float(rate), clusters)
        if key not in self._cache:
            y = self.dense(name) if method == "dense" else self.outputs(method, rate, clusters)[name]
            self._cache[key] = w1_to_gaussian(y).cpu()
        return self._cache[key]

    def w1_to_dense(self, name: str, method: str, rate: float, clusters: int | None = None) -> torch.Tensor:
        """W1(sparse outputs, dense outputs) per neuron, in units of the dense output's std."""
        dense = self.dense(name)
        sparse = self.outputs(method, rate, clusters)[name]
        return (w1_between(sparse, dense) / dense.double().std(0, unbiased=False).clamp(min=1e-30)).cpu()

    def ranking(self, name: str) -> torch.Tensor:
        """Neuron indices of `name` by decreasing dense distance to N(0, 1)."""
        return torch.argsort(self.w1_gaussian(name), descending=True)

    def wasserstein(self, name: str) -> torch.Tensor:
        """Indices of the Wasserstein neurons (top `top_percent`)."""
        r = self.ranking(name)
        return r[:top_count(r.numel(), self.config.top_percent)]


def analyze_layer(model: nn.Module, calib_ids: torch.Tensor, eval_ids: torch.Tensor,
                  config: AnalysisConfig | None = None) -> LayerAnalysis:
    """Capture one block's FFN input over calibration ids [N, L] (all positions) and held-out
    ids [M, L'] (positions ≥ skip_first), by capture_linear_inputs."""
    cfg = config or AnalysisConfig()
    b = resolve_block(model, cfg.block)
    names = resolve_linears(model, cfg.linears)
    block = decoder_blocks(model)[b]
    first = block.get_submodule(names[0])
    t0 = time.perf_counter()
    calib = capture_linear_inputs(model, calib_ids, [first], cfg.batch_size)[0]
    keep = _kept_positions(eval_ids.shape[1], cfg.skip_first)
    x = torch.cat(capture_linear_inputs(model, eval_ids, [first], cfg.batch_size, keep)[0])
    weights = {n: linear_weight(block.get_submodule(n)).detach().float().clone() for n in names}
    biases = {n: None if block.get_submodule(n).bias is None else block.get_submodule(n).bias.detach().float()
              for n in names}
    _log(cfg, f"[analyze] block {b} {','.join(names)}: {sum(c.shape[0] for c in calib)} calibration tokens, "
              f"{x.shape[0]} held-out tokens ({time.perf_counter() - t0:.1f} s)")
    return LayerAnalysis(model, b, names, calib, x, weights, biases, replace(cfg, block=b, linears=names))


# ---- output files -----------------------------------------------------------------------------------

_PLOT_NOTE_SHOWN = False


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot(cfg: AnalysisConfig):
    """matplotlib.pyplot (Agg), or None when figures are off or matplotlib is missing (with a note)."""
    global _PLOT_NOTE_SHOWN
    if cfg.plots is False:
        return None
    if not matplotlib_available():
        if cfg.plots:
            raise UsageError("figures need matplotlib: pip install matplotlib (the 'plots' extra), "
                             "or turn figures off (--no-plots)")
        if not _PLOT_NOTE_SHOWN:
            print("[analyze] matplotlib is not installed: CSV/JSON only, no figures (pip install matplotlib)")
            _PLOT_NOTE_SHOWN = True
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path, written: list) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    written.append(str(path))


def _write_csv(path: Path, rows: list[dict], written: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    written.append(str(path))


def _write_json(path: Path, data: dict, written: list) -> None:
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    written.append(str(path))


def _quantiles(t: torch.Tensor) -> dict:
    t = t.double()
    qs = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.97, 1.0], dtype=torch.float64)
    vals = torch.quantile(t, qs)
    return {k: float(v) for k, v in zip(("min", "p25", "median", "p75", "p97", "max"), vals)} | {
        "mean": float(t.mean())}


def _mean(t: torch.Tensor, idx=None) -> float:
    t = t.double() if idx is None else t[idx].double()
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else float("nan")
