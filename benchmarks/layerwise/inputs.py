"""The layers the benchmark prunes: synthetic activations at Llama-2 FFN shapes, or the inputs
of one SmolLM2 MLP captured by forward hooks."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import SHAPES, BenchConfig


@dataclass
class LayerInputs:
    name: str
    weight: torch.Tensor          # [d_out, d_in] fp32
    calib: list[torch.Tensor]     # accumulation batches [b, d_in] in the run's dtype
    heldout: torch.Tensor         # [M, d_in], same distribution, not used for calibration
    source: str


class SyntheticActivations:
    """Random activations with a decaying spectrum, cluster structure and outlier channels.

    Tokens come from a mixture of `clusters` Gaussians in an r-dimensional latent space (scales
    (1+i)^-0.75, so PCA finds the leading directions) mapped to d features by a fixed random
    matrix, plus isotropic noise. Each cluster has its own mean (in the leading directions) and
    its own stretch of every latent direction, so clusters have different Hessians; cluster
    sizes are unequal; a few feature channels are 8x larger, like LLM outlier features.
    """

    def __init__(self, d: int, clusters: int = 16, seed: int = 0, device="cpu"):
        g = torch.Generator(device=device).manual_seed(seed)
        r = min(d, max(16, d // 4))
        self.d, self.device = d, device
        self.spectrum = (1.0 + torch.arange(r, device=device)) ** -0.75
        self.mix = torch.randn(r, d, generator=g, device=device) / math.sqrt(r)
        self.means = 2.5 * torch.randn(clusters, r, generator=g, device=device) * self.spectrum
        self.stretch = torch.exp(0.5 * torch.randn(clusters, r, generator=g, device=device)) * self.spectrum
        self.weights = torch.softmax(0.7 * torch.randn(clusters, generator=g, device=device), 0)
        self.channel = torch.ones(d, device=device)
        outliers = torch.randperm(d, generator=g, device=device)[:max(1, d // 128)]
        self.channel[outliers] = 8.0
        self.noise = 0.05

    def sample(self, n: int, seed: int, dtype: torch.dtype, chunk: int = 16384) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = torch.empty(n, self.d, dtype=dtype, device=self.device)
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            lab = torch.multinomial(self.weights, m, replacement=True, generator=g)
            z = self.means[lab] + self.stretch[lab] * torch.randn(m, self.spectrum.numel(), generator=g,
                                                                  device=self.device)
            x = z @ self.mix + self.noise * torch.randn(m, self.d, generator=g, device=self.device)
            out[s:s + m] = (x * self.channel).to(dtype)
        return out


def scaled_shape(name: str, scale: int) -> tuple[int, int]:
    """(d_in, d_out) divided by `scale`, rounded down to multiples of 4 (2:4 needs d_in % 4 == 0)."""
    return tuple(max(4, (v // scale) // 4 * 4) for v in SHAPES[name])


def synthetic_layer(cfg: BenchConfig, name: str, shape_seed: int) -> LayerInputs:
    d_in, d_out = scaled_shape(name, cfg.scale)
    dev = cfg.device
    src = SyntheticActivations(d_in, 16, cfg.seed + 1000 * shape_seed, dev)
    per_batch = cfg.batch_windows * cfg.seqlen
    total = cfg.nsamples * cfg.seqlen
    calib = list(src.sample(total, cfg.seed + 1, cfg.torch_dtype).split(per_batch))
    heldout = src.sample(cfg.heldout_tokens, cfg.seed + 2, cfg.torch_dtype)
    g = torch.Generator(device=dev).manual_seed(cfg.seed + 3 + shape_seed)
    W = torch.randn(d_out, d_in, generator=g, device=dev) / math.sqrt(d_in)
    label = name if cfg.scale == 1 else f"{name}/{cfg.scale}"
    return LayerInputs(label, W, calib, heldout, "synthetic")


class _Stop(Exception):
    pass


@torch.no_grad()
def smollm2_layers(cfg: BenchConfig) -> list[LayerInputs]:
    """Inputs of model.model.layers[cfg.layer].mlp.{gate_proj, down_proj} of the embedded SmolLM2:
    calibration windows from the Wikipedia train split, held-out windows from its test split."""
    from sparse_expansion.data import calibration_windows, evaluation_windows
    from sparse_expansion.storage.loading import load_model
    model, tok = load_model("smollm2", dtype=cfg.torch_dtype, device=cfg.device)
    calib_ids = calibration_windows(tok, "wiki", cfg.nsamples, cfg.seqlen, cfg.seed)
    test_ids = evaluation_windows(tok, "wiki", cfg.seqlen, max_windows=math.ceil(cfg.heldout_tokens / cfg.seqlen))
    mlp = model.model.layers[cfg.layer].mlp
    linears = {"gate": mlp.gate_proj, "down": mlp.down_proj}
    store: dict[str, list[torch.Tensor]] = {k: [] for k in linears}

    def grab(key):
        def hook(_m, args):
            store[key].append(args[0].reshape(-1, args[0].shape[-1]).detach().clone())
            if key == "down":
                raise _Stop  # nothing after this layer's down_proj is needed
        return hook

    hooks = [m.register_forward_pre_hook(grab(k)) for k, m in linears.items()]
    try:
        captured = {}
        for part, ids in (("calib", calib_ids), ("heldout", test_ids)):
            for k in store:
                store[k].clear()
            for batch in ids.split(cfg.batch_windows):
                try:
                    model(batch.to(cfg.device), use_cache=False)
                except _Stop:
                    pass
            captured[part] = {k: list(v) for k, v in store.items()}
    finally:
        for h in hooks:
            h.remove()
    out = []
    for k, m in linears.items():
        held = torch.cat(captured["heldout"][k])[:cfg.heldout_tokens]
        out.append(LayerInputs(f"smollm2_L{cfg.layer}_{k}", m.weight.detach().float().clone(),
                               captured["calib"][k], held, "smollm2"))
    del model
    return out
