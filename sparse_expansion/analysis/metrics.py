"""The maths of the analysis: plain tensors in, fp64 tensors or floats out.

  standardize         zero mean, unit variance per column
  w1_to_gaussian      exact 1-D Wasserstein-1 distance of each column's (standardised) sample to
                      N(0, 1), from the sorted sample and the normal quantile function
  w1_between          exact 1-D W1 between two empirical distributions per column
  mapping_difficulty  mean over random token pairs of (|Δy| / median |Δy|) / (‖Δx‖ / max ‖Δx‖)
  pearson, spearman   correlations over the finite entries
  top_count           how many neurons the top p% are
"""
from __future__ import annotations

import math

import numpy as np
import torch

SQRT_2PI = math.sqrt(2.0 * math.pi)


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
