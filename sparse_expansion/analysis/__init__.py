"""Neuron-level analysis (the paper's §3-4): Wasserstein neurons, output distributions under
pruning, mapping difficulty, and targeted ablation.

A *neuron* is one output row of an FFN linear (default: gate_proj and up_proj of a Llama MLP);
its *output* over a set of tokens is its pre-activation y_t = w·x_t (+ b). Everything here only
reads the model; the pruned layers are copies.

Pieces (plain tensors in, tensors out; outputs are [T tokens, M neurons]):
  w1_to_gaussian      exact 1-D Wasserstein-1 distance of each neuron's standardised outputs to
                      N(0, 1), from the sorted sample and the normal quantile function
  w1_between          exact 1-D W1 between two empirical distributions per neuron
  mapping_difficulty  mean over random token pairs of (|Δy| / median |Δy|) / (‖Δx‖ / max ‖Δx‖)
  capture_linear_inputs  a linear's inputs, by a forward pre-hook that stops the forward there
  LayerAnalysis       one block's linears: calibration inputs (Hessians, routers), held-out
                      inputs (output distributions) and pruned copies made with the driver's
                      own methods (SparseGPT, Sparse Expansion, magnitude)
Experiments (each writes PNG figures and CSV/JSON under an output folder):
  neurons, histograms, clusters, sparsity-sweep, ablation; `run_experiments` runs a list.

Data protocol: routers and Hessians come from calibration windows (train split); the output
distributions, distances and mapping difficulty are measured on held-out evaluation windows
(test split), leaving out the first `skip_first` positions of every window (position 0 is the
attention-sink token, whose hidden state is an outlier shared by every window).
"""
from __future__ import annotations

import copy
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UsageError

EXPERIMENTS = ("neurons", "histograms", "clusters", "sparsity-sweep", "ablation")
SQRT_2PI = math.sqrt(2.0 * math.pi)


# ---- distances ------------------------------------------------------------------------------------

def standardize(y: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """y to zero mean and unit (population) variance along `dim` (default: each column of [T, M]),
    in fp64. A constant column becomes all zeros (its distance to N(0, 1) is then E|Z| = √(2/π)).
    """
    y = y.double()
    centred = y - y.mean(dim, keepdim=True)
    std = centred.square().mean(dim, keepdim=True).sqrt()
    return torch.where(std > 0, centred / torch.where(std > 0, std, 1.0), 0.0)


def _sort_rows(t: torch.Tensor) -> torch.Tensor:
    """Each row of t [M, n] sorted ascending (numpy's vectorised sort on CPU: ~15x torch's there)."""
    t = t.detach().contiguous()
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(t.numpy(), axis=1))
    return torch.sort(t, dim=1).values


def _normal_pdf(t: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * t * t) / SQRT_2PI  # 0 at ±inf


def w1_to_gaussian(y: torch.Tensor, normalize: bool = True, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """W1 distance [M] (fp64) between each column of y [T, M] and the standard normal.

    With the sorted sample x_(1) ≤ … ≤ x_(n), the quantile function of the sample is x_(i) on
    ((i−1)/n, i/n], so W1 = ∫₀¹ |F⁻¹(u) − Φ⁻¹(u)| du = Σ_i ∫_{α_i}^{β_i} |x_(i) − z| φ(z) dz with
    u = Φ(z), α_i = Φ⁻¹((i−1)/n), β_i = Φ⁻¹(i/n). With G(t) = ∫_{−∞}^t (x − z) φ(z) dz =
    x·Φ(t) + φ(t) and c = clamp(x, α, β) the integral is exactly 2G(c) − G(α) − G(β); the end
    intervals need no special case: α_1 = −∞ and β_n = +∞ give G = 0 and G = x (Φ(α) and Φ(β)
    are the grid points themselves, φ(±∞) = 0). Computed in fp64, deterministic, vectorised over
    neurons (chunked to about `chunk_elements` values at a time).
    """
    if y.dim() == 1:
        y = y[:, None]
    n, m = y.shape
    if n == 0:
        raise ValueError("w1_to_gaussian needs at least one sample")
    dev = y.device
    grid = torch.arange(n + 1, dtype=torch.float64, device=dev) / n
    a, b = grid[:-1], grid[1:]                                    # Φ(α_i), Φ(β_i)
    alpha, beta = torch.special.ndtri(a), torch.special.ndtri(b)  # −inf at 0, +inf at 1
    end_terms = _normal_pdf(alpha) + _normal_pdf(beta)            # [n]
    out = torch.empty(m, dtype=torch.float64, device=dev)
    step = max(1, chunk_elements // n)
    for s in range(0, m, step):
        x = _sort_rows(y[:, s:s + step].t())                # [neurons, n]
        x = standardize(x, dim=1) if normalize else x.double()            # affine: keeps the order
        c = torch.clamp(x, alpha, beta)
        parts = 2.0 * (x * torch.special.ndtr(c) + _normal_pdf(c)) - x * (a + b) - end_terms
        out[s:s + step] = parts.clamp(min=0).sum(1)
    return out


def w1_between(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact W1 [M] (fp64) between the empirical distributions of the columns of u [Tu, M] and
    v [Tv, M]: ∫₀¹ |F_u⁻¹ − F_v⁻¹|. Equal sizes: the mean of |sorted u − sorted v|; otherwise
    both quantile functions are evaluated on the merged grid {i/Tu} ∪ {j/Tv}."""
    if u.dim() == 1:
        u, v = u[:, None], v[:, None]
    us = _sort_rows(u.t()).double()  # [M, Tu]
    vs = _sort_rows(v.t()).double()
    nu, nv = us.shape[1], vs.shape[1]
    if nu == nv:
        return (us - vs).abs().mean(1)
    edges = torch.unique(torch.cat([torch.arange(nu + 1, dtype=torch.float64) / nu,
                                    torch.arange(nv + 1, dtype=torch.float64) / nv])).to(us.device)
    mid, width = 0.5 * (edges[1:] + edges[:-1]), edges[1:] - edges[:-1]
    iu = (mid * nu).long().clamp(max=nu - 1)  # quantile index of each merged interval
    iv = (mid * nv).long().clamp(max=nv - 1)
    return (width * (us[:, iu] - vs[:, iv]).abs()).sum(1)




def mapping_difficulty(x: torch.Tensor, y: torch.Tensor, pairs: int = 50_000, seed: int = 0,
                       chunk_elements: int = 1 << 23) -> tuple[torch.Tensor, dict]:
    """Mapping difficulty [M] (fp64) of each neuron whose outputs y [T, M] come from inputs x [T, d].

    Draw `pairs` token pairs (i, j), i ≠ j, uniformly (with replacement across pairs); for neuron k
    MD_k = mean over pairs of (|y_ik − y_jk| / median_pairs |Δy_k|) ÷ (‖x_i − x_j‖ / max_pairs ‖Δx‖)
    (the median is the lower median for an even number of pairs).
    Large values: nearby inputs are sent far apart relative to the neuron's typical output gap.
    Pairs of identical inputs (‖Δx‖ = 0) are dropped and counted. Returns (MD, info) with
    info = {'pairs', 'dropped_pairs', 'max_input_distance'}; a neuron whose median gap is 0 gets NaN.
    """
    T = x.shape[0]
    if T < 2:
        raise ValueError("mapping_difficulty needs at least two tokens")
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(0, T, (pairs,), generator=gen)
    j = (i + torch.randint(1, T, (pairs,), generator=gen)) % T
    i, j = i.to(x.device), j.to(x.device)
    dx = (x[i].double() - x[j].double()).norm(dim=1)
    keep = dx > 0
    i, j, dx = i[keep], j[keep], dx[keep]
    if dx.numel() == 0:
        raise ValueError("every drawn pair has identical inputs")
    dmax = dx.max()
    rel_dx = (dx / dmax)[:, None]
    M = y.shape[1]
    out = torch.empty(M, dtype=torch.float64, device=y.device)
    step = max(1, chunk_elements // dx.numel())
    inv_rel_dx = (1.0 / rel_dx).t()  # [1, pairs]
    for s in range(0, M, step):
        dy = (y[i, s:s + step] - y[j, s:s + step]).abs().t().contiguous()  # [neurons, pairs]
        med = dy.median(dim=1, keepdim=True).values  # lower median for an even count
        ratio = dy / torch.where(med > 0, med, 1.0) * inv_rel_dx.to(dy.dtype)
        out[s:s + step] = torch.where(med[:, 0] > 0, ratio.mean(1, dtype=torch.float64), torch.nan)
    return out, {"pairs": int(dx.numel()), "dropped_pairs": int((~keep).sum()),
                 "max_input_distance": float(dmax)}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok].double(), b[ok].double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-300))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ok = torch.isfinite(a) & torch.isfinite(b)
    rank = lambda t: torch.argsort(torch.argsort(t)).double()  # noqa: E731 (ties: negligible here)
    return pearson(rank(a[ok]), rank(b[ok]))


def top_count(neurons: int, percent: float) -> int:
    """Number of 'Wasserstein neurons' among `neurons` at the top `percent` (at least one)."""
    return max(1, round(neurons * percent / 100.0))


# ---- capturing a linear's inputs ---------------------------------------------------------------------

class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_linear_inputs(model: nn.Module, ids: torch.Tensor, modules: list[nn.Module], batch_size: int = 8,
                          keep_positions: torch.Tensor | None = None) -> list[list[torch.Tensor]]:
    """Inputs of each of `modules` (given in forward order) over token ids [N, L].

    A forward pre-hook on each module records its input (fp32, [B·L', d] per batch, only the
    positions where `keep_positions` [L] is True); the hook of the last module stops the forward
    pass, so nothing after it is computed. Returns one list of per-batch tensors per module.
    """
    store: list[list[torch.Tensor]] = [[] for _ in modules]
    last = len(modules) - 1

    def hook(k):
        def fn(_module, args):
            x = args[0]
            if keep_positions is not None:
                x = x[:, keep_positions.to(x.device)]
            store[k].append(x.reshape(-1, x.shape[-1]).float().clone())
            if k == last:
                raise _StopForward
        return fn

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in enumerate(modules)]
    device = next(model.parameters()).device
    try:
        for batch in ids.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return store


def _kept_positions(seqlen: int, skip_first: int) -> torch.Tensor:
    if skip_first >= seqlen:
        raise UsageError(f"--skip-first {skip_first} leaves no token of a {seqlen}-token window")
    return torch.arange(seqlen) >= skip_first


# ---- configuration -----------------------------------------------------------------------------------

@dataclass
class AnalysisConfig:
    block: int | None = None              # analysed decoder block (None: the middle one)
    linears: tuple[str, ...] | None = None  # linears sharing one input (None: the family's first FFN group)
    sparsity: float = 0.9                 # rate of the SparseGPT / Sparse Expansion variants
    clusters: int = 16                    # Sparse Expansion experts
    pca_factor: int = 32
    kmeans_restarts: int = 10
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
    from ..models import family_of
    groups = family_of(model).ffn
    if linears is None:
        return tuple(groups[0])
    for g in groups:
        if set(linears) <= set(g):
            return tuple(linears)
    raise UsageError(f"--linears {','.join(linears)}: give linears of one FFN input group, one of "
                     f"{'; '.join(','.join(g) for g in groups)}")


def resolve_block(model: nn.Module, block: int | None) -> int:
    from ..models import decoder_blocks
    count = len(decoder_blocks(model))
    if block is None:
        return count // 2
    if not 0 <= block < count:
        raise UsageError(f"--block {block}: the model has blocks 0 to {count - 1}")
    return block


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
            from ..config import PruneConfig
            from ..methods import ExpansionOptions, collect
            from ..sparsity import Sparsity
            cfg = self.config
            options = ExpansionOptions(clusters=clusters or cfg.clusters, pca_factor=cfg.pca_factor,
                                       kmeans_restarts=cfg.kmeans_restarts) if method == "sparse-expansion" else None
            pc = PruneConfig(method=method, sparsity=Sparsity(float(rate)), seed=cfg.seed, options=options)
            from ..models import decoder_blocks
            holder = copy.deepcopy(decoder_blocks(self.model)[self.block])
            layers = {n: holder.get_submodule(n) for n in self.names}
            prune = pc.make_method()
            collector = collect(prune, layers, self.calib)
            t0 = time.perf_counter()
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
    ids [M, L'] (positions ≥ skip_first), by a pre-hook during a forward of the dense model."""
    cfg = config or AnalysisConfig()
    from ..models import decoder_blocks, linear_weight
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
    import importlib.util
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


# ---- experiments -----------------------------------------------------------------------------------

def experiment_neurons(layer: LayerAnalysis, out: Path) -> dict:
    """Wasserstein neurons of the layer: their distances, weight norms, mapping difficulty, and how
    far SparseGPT and Sparse Expansion move their outputs. Writes neurons.csv/json and
    neurons_distance.png, neurons_mapping.png."""
    cfg, written, rows = layer.config, [], []
    summary = {"block": layer.block, "tokens": layer.tokens, "sparsity": cfg.sparsity, "clusters": cfg.clusters,
               "top_percent": cfg.top_percent, "linears": {}}
    plt = _pyplot(cfg)
    figs = None
    if plt is not None:
        n = len(layer.names)
        figs = (plt.subplots(1, n, figsize=(4.6 * n, 3.6), squeeze=False),
                plt.subplots(1, n, figsize=(4.6 * n, 3.8), squeeze=False))
    for k, name in enumerate(layer.names):
        t0 = time.perf_counter()
        W = layer.weights[name]
        R = W.shape[0]
        w1 = layer.w1_gaussian(name)
        wn = layer.wasserstein(name)
        is_wn = torch.zeros(R, dtype=torch.bool)
        is_wn[wn] = True
        norms = W.double().norm(dim=1).cpu()
        std = layer.dense(name).double().std(0, unbiased=False).cpu()
        md, md_info = mapping_difficulty(layer.x, layer.dense(name), cfg.pairs, cfg.seed)
        md = md.cpu()
        d_sgpt = layer.w1_to_dense(name, "sparsegpt", cfg.sparsity)
        d_se = layer.w1_to_dense(name, "sparse-expansion", cfg.sparsity, cfg.clusters)
        raw_sgpt, raw_se = d_sgpt * std, d_se * std
        rank = torch.empty(R, dtype=torch.long)
        rank[layer.ranking(name)] = torch.arange(R)
        norm_pct = torch.argsort(torch.argsort(norms)).double() / max(R - 1, 1) * 100
        for i in range(R):
            rows.append({"linear": name, "neuron": i, "rank": int(rank[i]), "wasserstein": int(is_wn[i]),
                         "w1_gaussian": float(w1[i]), "weight_norm": float(norms[i]), "output_std": float(std[i]),
                         "mapping_difficulty": float(md[i]),
                         "w1_sparsegpt_to_dense": float(raw_sgpt[i]), "w1_expansion_to_dense": float(raw_se[i]),
                         "w1_sparsegpt_to_dense_over_std": float(d_sgpt[i]),
                         "w1_expansion_to_dense_over_std": float(d_se[i])})
        rest = ~is_wn
        summary["linears"][name] = {
            "neurons": R, "wasserstein_neurons": int(is_wn.sum()), "fraction": float(is_wn.float().mean()),
            "threshold_w1": float(w1[wn].min()),
            "w1_gaussian_all": _quantiles(w1), "w1_gaussian_wasserstein": _quantiles(w1[wn]),
            "weight_norm": {"wasserstein_mean": _mean(norms, is_wn), "others_mean": _mean(norms, rest),
                            "ratio": _mean(norms, is_wn) / _mean(norms, rest),
                            "wasserstein_mean_percentile": _mean(norm_pct, is_wn),
                            "pearson_with_w1": pearson(norms, w1), "spearman_with_w1": spearman(norms, w1)},
            "mapping_difficulty": {"wasserstein_mean": _mean(md, is_wn), "others_mean": _mean(md, rest),
                                   "pearson_with_w1": pearson(md, w1), "spearman_with_w1": spearman(md, w1),
                                   **md_info},
            "w1_to_dense_over_std": {
                "sparsegpt": {"wasserstein_mean": _mean(d_sgpt, is_wn), "others_mean": _mean(d_sgpt, rest)},
                "sparse_expansion": {"wasserstein_mean": _mean(d_se, is_wn), "others_mean": _mean(d_se, rest)},
                "expansion_closer_fraction": {"wasserstein": float((d_se < d_sgpt)[is_wn].float().mean()),
                                              "all": float((d_se < d_sgpt).float().mean())}},
            "w1_to_dense_raw": {
                "sparsegpt": {"wasserstein_mean": _mean(raw_sgpt, is_wn), "others_mean": _mean(raw_sgpt, rest)},
                "sparse_expansion": {"wasserstein_mean": _mean(raw_se, is_wn), "others_mean": _mean(raw_se, rest)}},
            "output_std": {"wasserstein_mean": _mean(std, is_wn), "others_mean": _mean(std, rest)},
        }
        _log(cfg, f"[neurons] {name}: {int(is_wn.sum())}/{R} Wasserstein neurons (W1 ≥ {float(w1[wn].min()):.3f}, "
                  f"median of all {float(w1.median()):.3f}); MD~W1 spearman {spearman(md, w1):.2f} "
                  f"({time.perf_counter() - t0:.1f} s)")
        if figs is not None:
            ax = figs[0][1][0][k]
            bins = torch.linspace(0, float(w1.max()) * 1.02, 60).numpy()
            ax.hist(w1[rest].numpy(), bins=bins, color="0.6", label="other neurons")
            ax.hist(w1[wn].numpy(), bins=bins, color="C3", label=f"top {cfg.top_percent:g}% (Wasserstein)")
            ax.set_yscale("log")
            ax.set_xlabel("W1 of standardised output to N(0,1)")
            ax.set_ylabel("neurons")
            ax.set_title(f"block {layer.block} {_short(name)}")
            ax.legend(fontsize=8)
            ax = figs[1][1][0][k]
            ax.scatter(w1[rest].numpy(), md[rest].numpy(), s=4, color="0.5", alpha=0.5, label="other neurons")
            ax.scatter(w1[wn].numpy(), md[wn].numpy(), s=9, color="C3", label="Wasserstein neurons")
            ax.set_xlabel("W1 to N(0,1)")
            ax.set_ylabel("mapping difficulty")
            ax.set_title(f"{_short(name)}: spearman {spearman(md, w1):.2f}, pearson {pearson(md, w1):.2f}")
            ax.legend(fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "neurons.csv", rows, written)
    if figs is not None:
        _save(figs[0][0], out / "neurons_distance.png", written)
        _save(figs[1][0], out / "neurons_mapping.png", written)
    summary["files"] = written + [str(out / "neurons.json")]
    _write_json(out / "neurons.json", summary, written)
    return summary


def experiment_histograms(layer: LayerAnalysis, out: Path) -> dict:
    """Output histograms of dense, SparseGPT and Sparse Expansion for the top Wasserstein neurons
    of each linear. Writes histograms.png, histograms.csv, histograms.json."""
    cfg, written, rows = layer.config, [], []
    plt = _pyplot(cfg)
    n = len(layer.names)
    fig = axes = None
    if plt is not None:
        fig, axes = plt.subplots(n, cfg.show, figsize=(3.6 * cfg.show, 3.0 * n), squeeze=False)
    for k, name in enumerate(layer.names):
        dense = layer.dense(name)
        sgpt = layer.outputs("sparsegpt", cfg.sparsity)[name]
        se = layer.outputs("sparse-expansion", cfg.sparsity, cfg.clusters)[name]
        d_sgpt = layer.w1_to_dense(name, "sparsegpt", cfg.sparsity)
        d_se = layer.w1_to_dense(name, "sparse-expansion", cfg.sparsity, cfg.clusters)
        g_dense = layer.w1_gaussian(name)
        g_sgpt = layer.w1_gaussian(name, "sparsegpt", cfg.sparsity)
        g_se = layer.w1_gaussian(name, "sparse-expansion", cfg.sparsity, cfg.clusters)
        raw_sgpt = w1_between(sgpt, dense).cpu()
        raw_se = w1_between(se, dense).cpu()
        for r, i in enumerate(layer.ranking(name)[:cfg.show].tolist()):
            rows.append({"linear": name, "neuron": i, "rank": r, "w1_gaussian_dense": float(g_dense[i]),
                         "w1_gaussian_sparsegpt": float(g_sgpt[i]), "w1_gaussian_expansion": float(g_se[i]),
                         "w1_sparsegpt_to_dense": float(raw_sgpt[i]), "w1_expansion_to_dense": float(raw_se[i]),
                         "w1_sparsegpt_to_dense_over_std": float(d_sgpt[i]),
                         "w1_expansion_to_dense_over_std": float(d_se[i]),
                         "dense_mean": float(dense[:, i].mean()), "dense_std": float(dense[:, i].std())})
            if axes is not None:
                ax = axes[k][r]
                vals = [dense[:, i].cpu(), sgpt[:, i].cpu(), se[:, i].cpu()]
                lo = min(float(torch.quantile(v, 0.001)) for v in vals)
                hi = max(float(torch.quantile(v, 0.999)) for v in vals)
                bins = torch.linspace(lo, hi, 80).numpy()
                ax.hist(vals[0].numpy(), bins=bins, histtype="stepfilled", color="0.75", label="dense")
                ax.hist(vals[1].numpy(), bins=bins, histtype="step", color="C3", lw=1.3, label="SparseGPT")
                ax.hist(vals[2].numpy(), bins=bins, histtype="step", color="C0", lw=1.3,
                        label=f"Sparse Expansion ({cfg.clusters})")
                ax.set_title(f"{_short(name)} #{i} (W1 to N(0,1): {float(g_dense[i]):.2f})\n"
                             f"W1 to dense: SparseGPT {float(raw_sgpt[i]):.3f}, SE {float(raw_se[i]):.3f}",
                             fontsize=8.5)
                ax.set_yticks([])
                if r == 0:
                    ax.legend(fontsize=7)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "histograms.csv", rows, written)
    if fig is not None:
        fig.suptitle(f"block {layer.block}: top Wasserstein neurons, outputs on {layer.tokens} held-out tokens, "
                     f"{cfg.sparsity:g} sparsity", fontsize=10)
        _save(fig, out / "histograms.png", written)
    summary = {"block": layer.block, "sparsity": cfg.sparsity, "clusters": cfg.clusters, "neurons": rows,
               "prune_reports": {f"{m}@{r:g}" + (f"x{c}" if c else ""): v for (m, r, c), v in layer.reports.items()}}
    summary["files"] = written + [str(out / "histograms.json")]
    _write_json(out / "histograms.json", summary, written)
    return summary


def experiment_clusters(layer: LayerAnalysis, out: Path) -> dict:
    """W1(sparse, dense) of the top Wasserstein neurons against the number of Sparse Expansion
    clusters (1 cluster = SparseGPT). Writes clusters.png, clusters.csv, clusters.json."""
    cfg, written, rows = layer.config, [], []
    checks = {}
    for name in layer.names:
        wn = layer.wasserstein(name)
        for K in cfg.cluster_counts:
            t0 = time.perf_counter()
            d = layer.w1_to_dense(name, "sparse-expansion", cfg.sparsity, K)
            row = {"linear": name, "clusters": K, "wasserstein_mean": _mean(d, wn), "all_mean": _mean(d)}
            for r, i in enumerate(layer.ranking(name)[:cfg.show].tolist()):
                row[f"top{r + 1}_neuron{i}"] = float(d[i])
            rows.append(row)
            _log(cfg, f"[clusters] {name} K={K}: W1(sparse, dense)/σ mean over Wasserstein neurons "
                      f"{row['wasserstein_mean']:.4f}, all {row['all_mean']:.4f} ({time.perf_counter() - t0:.1f} s)")
        if 1 in cfg.cluster_counts:  # one cluster must be SparseGPT exactly
            diff = (layer.outputs("sparse-expansion", cfg.sparsity, 1)[name]
                    - layer.outputs("sparsegpt", cfg.sparsity)[name]).abs().max()
            checks[name] = {"max_abs_diff_1_cluster_vs_sparsegpt": float(diff)}
    out.mkdir(parents=True, exist_ok=True)
    # one CSV: per-neuron columns differ between linears, so write them long-form
    long_rows = []
    for row in rows:
        for key, val in row.items():
            if key not in ("linear", "clusters"):
                long_rows.append({"linear": row["linear"], "clusters": row["clusters"], "series": key,
                                  "w1_to_dense_over_std": val})
    _write_csv(out / "clusters.csv", long_rows, written)
    plt = _pyplot(cfg)
    if plt is not None:
        n = len(layer.names)
        fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 3.8), squeeze=False)
        for k, name in enumerate(layer.names):
            ax = axes[0][k]
            mine = [r for r in rows if r["linear"] == name]
            Ks = [r["clusters"] for r in mine]
            for key in [c for c in mine[0] if c.startswith("top")]:
                ax.plot(Ks, [r[key] for r in mine], "-o", ms=3, lw=1, alpha=0.7, label=key.split("_")[1])
            ax.plot(Ks, [r["wasserstein_mean"] for r in mine], "-s", color="C3", lw=2.2,
                    label=f"mean, top {cfg.top_percent:g}%")
            ax.plot(Ks, [r["all_mean"] for r in mine], "--", color="k", lw=1.5, label="mean, all neurons")
            ax.set_xscale("log", base=2)
            ax.set_xticks(Ks, [str(x) for x in Ks])
            ax.set_xlabel("clusters (1 = SparseGPT)")
            ax.set_ylabel("W1(sparse, dense) / σ_dense")
            ax.set_title(f"block {layer.block} {_short(name)} at {cfg.sparsity:g} sparsity")
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        _save(fig, out / "clusters.png", written)
    summary = {"block": layer.block, "sparsity": cfg.sparsity, "rows": rows, "checks": checks}
    summary["files"] = written + [str(out / "clusters.json")]
    _write_json(out / "clusters.json", summary, written)
    return summary


def experiment_sparsity_sweep(layer: LayerAnalysis, out: Path, methods: tuple[str, ...] = ("sparsegpt", "magnitude")
                              ) -> dict:
    """Distance to N(0, 1) of neurons' outputs as the layer is pruned from 0% to 95% (SparseGPT and
    magnitude). Writes sparsity_sweep.png, sparsity_sweep.csv, sparsity_sweep.json."""
    cfg, written, rows = layer.config, [], []
    for name in layer.names:
        wn = layer.wasserstein(name)
        shown = layer.ranking(name)[:cfg.show].tolist()
        for method in methods:
            t0 = time.perf_counter()
            for rate in cfg.sweep_rates:
                g = layer.w1_gaussian(name, method if rate > 0 else "dense", rate)
                row = {"linear": name, "method": method, "sparsity": float(rate),
                       "wasserstein_mean": _mean(g, wn), "all_median": float(g.median()), "all_mean": _mean(g)}
                for r, i in enumerate(shown):
                    row[f"top{r + 1}"] = float(g[i])
                    row[f"top{r + 1}_neuron"] = i
                rows.append(row)
            first, last = rows[-len(cfg.sweep_rates)], rows[-1]
            _log(cfg, f"[sparsity-sweep] {name} {method}: W1 to N(0,1) of the Wasserstein neurons "
                      f"{first['wasserstein_mean']:.3f} ({first['sparsity']:g}) -> {last['wasserstein_mean']:.3f} "
                      f"({last['sparsity']:g}) ({time.perf_counter() - t0:.1f} s)")
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "sparsity_sweep.csv", rows, written)
    plt = _pyplot(cfg)
    if plt is not None:
        n = len(layer.names)
        fig, axes = plt.subplots(n, len(methods), figsize=(4.8 * len(methods), 3.6 * n), squeeze=False)
        for k, name in enumerate(layer.names):
            for m, method in enumerate(methods):
                ax = axes[k][m]
                mine = [r for r in rows if r["linear"] == name and r["method"] == method]
                xs = [100 * r["sparsity"] for r in mine]
                for r in range(cfg.show):
                    if f"top{r + 1}" in mine[0]:
                        ax.plot(xs, [q[f"top{r + 1}"] for q in mine], "-o", ms=2.5, lw=1, alpha=0.7,
                                label=f"#{mine[0][f'top{r + 1}_neuron']}")
                ax.plot(xs, [q["wasserstein_mean"] for q in mine], "-s", ms=3, color="C3", lw=2.2,
                        label=f"mean, top {cfg.top_percent:g}%")
                ax.plot(xs, [q["all_median"] for q in mine], "--", color="k", lw=1.5, label="median, all neurons")
                ax.set_xlabel("sparsity of the layer (%)")
                ax.set_ylabel("W1 of output to N(0,1)")
                ax.set_title(f"block {layer.block} {_short(name)}, {method}")
                ax.legend(fontsize=7)
        _save(fig, out / "sparsity_sweep.png", written)
    summary = {"block": layer.block, "rows": rows}
    summary["files"] = written + [str(out / "sparsity_sweep.json")]
    _write_json(out / "sparsity_sweep.json", summary, written)
    return summary


SELECTIONS = ("wasserstein", "random", "variance", "weight_norm")


@torch.no_grad()
def experiment_ablation(model: nn.Module, calib_ids: torch.Tensor, eval_ids: torch.Tensor, out: Path,
                        config: AnalysisConfig | None = None) -> dict:
    """Targeted pruning: in every block, prune only k = top_percent% of the rows of each analysed FFN
    linear (default gate_proj and up_proj) at `ablation_sparsity` with SparseGPT, the rows picked
    by distance to N(0, 1) (Wasserstein neurons), at random, by output variance or by weight norm
    (largest first); report the model's perplexity on eval_ids for each.

    One forward of the dense model over calib_ids captures every block's input (pre-hooks); each
    block's Hessian and inverse factor serve all selections (the selections are not applied
    sequentially: with 3% of the rows touched, later blocks' inputs barely change). The model is
    restored to its dense weights afterwards. Writes ablation.png, ablation.csv, ablation.json.
    """
    cfg = config or AnalysisConfig()
    from .. import solvers
    from ..methods import HessianStats
    from ..evaluate import perplexity
    from ..models import decoder_blocks, linear_weight, set_linear_weight
    from ..sparsity import Sparsity
    names = resolve_linears(model, cfg.linears)
    blocks = decoder_blocks(model)
    t0 = time.perf_counter()
    inputs = capture_linear_inputs(model, calib_ids, [b.get_submodule(names[0]) for b in blocks], cfg.batch_size)
    keep = _kept_positions(calib_ids.shape[1], cfg.skip_first).repeat(calib_ids.shape[0])
    t_capture = time.perf_counter() - t0
    sparsity = Sparsity(cfg.ablation_sparsity)
    gen = torch.Generator().manual_seed(cfg.seed)
    random_keys = ["random"] + [f"random{s + 1}" for s in range(1, cfg.ablation_random_seeds)]
    plans: dict[str, list] = {s: [] for s in ("wasserstein", *random_keys, "variance", "weight_norm")}
    overlap = {"random": [], "variance": [], "weight_norm": []}
    t0 = time.perf_counter()
    for b, block in enumerate(blocks):
        batches = inputs[b]
        stats = HessianStats(batches[0].shape[1], batches[0].device)
        for xb in batches:
            stats.add_batch(xb)
        factor = solvers.inverse_hessian_factor(stats.H, name=f"block{b}")
        x = torch.cat(batches)[keep.to(batches[0].device)]
        for name in names:
            module = block.get_submodule(name)
            W = linear_weight(module).detach().float()
            y = x @ W.t()
            R = W.shape[0]
            k = top_count(R, cfg.top_percent)
            picks = {"wasserstein": torch.argsort(w1_to_gaussian(y), descending=True)[:k].cpu(),
                     "variance": torch.argsort(y.var(0), descending=True)[:k].cpu(),
                     "weight_norm": torch.argsort(W.norm(dim=1), descending=True)[:k].cpu()}
            for key in random_keys:
                picks[key] = torch.randperm(R, generator=gen)[:k]
            wn = set(picks["wasserstein"].tolist())
            for key in overlap:
                overlap[key].append(len(wn & set(picks[key].tolist())) / k)
            for key, rows in picks.items():
                rows = rows.sort().values.to(W.device)
                W_hat, _ = solvers.sparsegpt(W[rows][None], factor, sparsity)
                plans[key].append((module, rows, W_hat[0]))
        del inputs[b][:]
    t_solve = time.perf_counter() - t0
    _log(cfg, f"[ablation] captured {len(blocks)} blocks' inputs ({t_capture:.1f} s), solved "
              f"{len(plans)} selections x {len(blocks) * len(names)} linears ({t_solve:.1f} s)")

    def evaluate(label):
        t = time.perf_counter()
        r = perplexity(model, eval_ids, cfg.batch_size, progress=False)
        _log(cfg, f"[ablation] {label}: perplexity {r['perplexity']:.4f} ({time.perf_counter() - t:.1f} s)")
        return r

    results = {"dense": evaluate("dense")}
    for key, plan in plans.items():
        saved = []
        try:
            for module, rows, W_rows in plan:
                W = linear_weight(module).detach().float().clone()
                saved.append((module, W.clone()))
                W[rows] = W_rows
                set_linear_weight(module, W)
            results[key] = evaluate(key)
        finally:
            for module, W in reversed(saved):
                set_linear_weight(module, W)
    k_rows = {n: top_count(linear_weight(blocks[0].get_submodule(n)).shape[0], cfg.top_percent) for n in names}
    table = [{"selection": key, "perplexity": r["perplexity"], "nll": r["nll"],
              "delta_vs_dense": r["perplexity"] - results["dense"]["perplexity"]} for key, r in results.items()]
    random_ppl = torch.tensor([results[k]["perplexity"] for k in random_keys], dtype=torch.float64)
    out.mkdir(parents=True, exist_ok=True)
    written: list = []
    _write_csv(out / "ablation.csv", table, written)
    plt = _pyplot(cfg)
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        keys = [t["selection"] for t in table if t["selection"] != "dense"]
        vals = [results[k]["perplexity"] for k in keys]
        colors = ["C3" if k == "wasserstein" else "0.55" for k in keys]
        ax.bar(range(len(keys)), vals, color=colors)
        ax.axhline(results["dense"]["perplexity"], color="k", ls="--", lw=1, label="dense")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(keys)), keys)
        lo = min(vals + [results["dense"]["perplexity"]])
        ax.set_ylim(lo * 0.98, max(vals) * 1.01)
        ax.set_ylabel("perplexity (held-out)")
        ax.set_title(f"{k_rows[names[0]]} rows ({cfg.top_percent:g}%) of each {'/'.join(_short(n) for n in names)} "
                     f"in all {len(blocks)} blocks pruned {cfg.ablation_sparsity:.0%} (SparseGPT)", fontsize=9)
        ax.legend(fontsize=8)
        _save(fig, out / "ablation.png", written)
    summary = {"linears": list(names), "blocks": len(blocks), "rows_per_linear": k_rows,
               "sparsity_of_selected_rows": cfg.ablation_sparsity,
               "calibration_tokens": int(calib_ids.numel()), "eval_tokens": int(eval_ids.numel()),
               "results": results, "table": table,
               "random_mean_perplexity": float(random_ppl.mean()),
               "random_std_perplexity": float(random_ppl.std()) if len(random_keys) > 1 else None,
               "mean_overlap_with_wasserstein": {k: sum(v) / len(v) for k, v in overlap.items()},
               "seconds": {"capture": t_capture, "solve": t_solve}}
    summary["files"] = written + [str(out / "ablation.json")]
    _write_json(out / "ablation.json", summary, written)
    return summary


def parse_experiments(text: str) -> tuple[str, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts == ["all"]:
        return EXPERIMENTS
    bad = [p for p in parts if p not in EXPERIMENTS]
    if bad or not parts:
        raise UsageError(f"--experiment {text!r}: use all or a comma-separated list of {', '.join(EXPERIMENTS)}")
    return tuple(dict.fromkeys(parts))


def run_experiments(model: nn.Module, calib_ids: torch.Tensor, eval_ids: torch.Tensor, out: str | Path,
                    experiments: tuple[str, ...] = EXPERIMENTS, config: AnalysisConfig | None = None,
                    ablation_calib_ids: torch.Tensor | None = None, ablation_eval_ids: torch.Tensor | None = None
                    ) -> dict:
    """Run the named experiments on token ids (calibration [N, L], held-out [M, L']) and write their
    files under `out`; the layer experiments share one LayerAnalysis. The ablation uses its own
    ids when given (perplexity windows), else the same ones. Returns {experiment: summary}."""
    cfg = config or AnalysisConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    layer_experiments = [e for e in experiments if e != "ablation"]
    if layer_experiments:
        layer = analyze_layer(model, calib_ids, eval_ids, cfg)
        funcs = {"neurons": experiment_neurons, "histograms": experiment_histograms,
                 "clusters": experiment_clusters, "sparsity-sweep": experiment_sparsity_sweep}
        for e in layer_experiments:
            t0 = time.perf_counter()
            results[e] = funcs[e](layer, out)
            results[e]["seconds"] = time.perf_counter() - t0
    if "ablation" in experiments:
        t0 = time.perf_counter()
        results["ablation"] = experiment_ablation(
            model, calib_ids if ablation_calib_ids is None else ablation_calib_ids,
            eval_ids if ablation_eval_ids is None else ablation_eval_ids, out, cfg)
        results["ablation"]["seconds_total"] = time.perf_counter() - t0
    return results


# ---- command line -----------------------------------------------------------------------------------

def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give comma-separated integers, e.g. 1,2,4,8,16") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"{flag} {text!r}: every value must be at least 1")
    return vals


def check_analyze_args(args) -> tuple[AnalysisConfig, tuple[str, ...]]:
    """Validate `sparse-expansion analyze` arguments before any model is loaded."""
    from ..checks import device as _device, positive as _positive, seqlen as _check_seqlen
    from ..data import check_source
    from ..loading import check_model_ref, meta_model
    from ..sparsity import Sparsity
    experiments = parse_experiments(args.experiment)
    rates = {}
    for flag, text in (("--sparsity", args.sparsity), ("--ablation-sparsity", args.ablation_sparsity)):
        s = Sparsity.parse(text)
        if s.structured:
            raise UsageError(f"{flag} {text}: the analysis uses unstructured rates, e.g. 0.9")
        rates[flag] = s.rate
    if not 0 < args.top_percent <= 100:
        raise UsageError(f"--top-percent {args.top_percent}: give a percentage in (0, 100], e.g. 3")
    for value, flag in ((args.nsamples, "--nsamples"), (args.eval_windows, "--eval-windows"),
                        (args.ablation_nsamples, "--ablation-nsamples"),
                        (args.ablation_eval_windows, "--ablation-eval-windows"), (args.pairs, "--pairs"),
                        (args.batch_size, "--batch-size"), (args.clusters, "--clusters"),
                        (args.show, "--show"), (args.random_seeds, "--random-seeds")):
        _positive(value, flag)
    if args.skip_first < 0:
        raise UsageError(f"--skip-first {args.skip_first}: must not be negative")
    check_source(args.calib)
    check_model_ref(args.model)
    _check_seqlen(args.model, args.seqlen)
    _check_seqlen(args.model, args.ablation_seqlen)
    _kept_positions(min(args.seqlen, args.ablation_seqlen), args.skip_first)
    _device(args.device)
    if not args.no_plots and not matplotlib_available():
        raise UsageError("figures need matplotlib: pip install matplotlib (the 'plots' extra), "
                         "or pass --no-plots for CSV/JSON only")
    linears = tuple(p.strip() for p in args.linears.split(",")) if args.linears else None
    meta = meta_model(args.model)
    cfg = AnalysisConfig(block=resolve_block(meta, args.block), linears=resolve_linears(meta, linears),
                         sparsity=rates["--sparsity"], clusters=args.clusters, pca_factor=args.pca_factor,
                         kmeans_restarts=args.kmeans_restarts, top_percent=args.top_percent, pairs=args.pairs,
                         show=args.show, cluster_counts=_int_list(args.cluster_counts, "--cluster-counts"),
                         ablation_sparsity=rates["--ablation-sparsity"], ablation_random_seeds=args.random_seeds,
                         skip_first=args.skip_first, batch_size=args.batch_size, seed=args.seed,
                         plots=not args.no_plots, progress=not args.quiet)
    return cfg, experiments


def cmd_analyze(args) -> int:
    """`sparse-expansion analyze MODEL --experiment ... --out DIR`."""
    from ..checks import device as _device
    from ..data import calibration_windows, evaluation_windows
    from ..loading import load_model
    cfg, experiments = check_analyze_args(args)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, device=_device(args.device))
    layer_exps = [e for e in experiments if e != "ablation"]
    calib = held_out = ab_calib = ab_eval = None
    if layer_exps:
        calib = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
        held_out = evaluation_windows(tokenizer, args.calib, args.seqlen, args.eval_windows)
    if "ablation" in experiments:
        ab_calib = calibration_windows(tokenizer, args.calib, args.ablation_nsamples, args.ablation_seqlen, args.seed)
        ab_eval = evaluation_windows(tokenizer, args.calib, args.ablation_seqlen, args.ablation_eval_windows)
    results = run_experiments(model, calib if calib is not None else ab_calib,
                              held_out if held_out is not None else ab_eval, args.out, experiments, cfg,
                              ab_calib, ab_eval)
    seconds = time.perf_counter() - t0
    run = {"command": "analyze", "arguments": vars(args), "config": cfg.as_dict(), "experiments": list(experiments),
           "data": {"calibration": None if calib is None else list(calib.shape),
                    "held_out": None if held_out is None else list(held_out.shape),
                    "ablation_calibration": None if ab_calib is None else list(ab_calib.shape),
                    "ablation_eval": None if ab_eval is None else list(ab_eval.shape)},
           "seconds": seconds, "torch_threads": torch.get_num_threads(),
           "seconds_per_experiment": {e: r.get("seconds", r.get("seconds_total")) for e, r in results.items()}}
    Path(args.out, "run.json").write_text(json.dumps(run, indent=1, default=str) + "\n")
    files = sorted({f for r in results.values() for f in r.get("files", [])})
    print(f"analyzed {args.model} ({', '.join(experiments)}) in {seconds:.1f} s; wrote {len(files) + 1} files "
          f"to {args.out}")
    return 0
