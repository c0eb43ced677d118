"""Layer solvers in plain torch: magnitude, Wanda and SparseGPT.

Weights are [E, R, C] (E same-shaped matrices solved together; E = 1 for one layer), inputs
columns are the last axis. Hessians are fp32 [E, C, C] running averages H = 2/n·XᵀX. Every
solver returns fp32 weights, pruned ones +0.0; the caller casts back to the layer's dtype.
"""
from dataclasses import dataclass, field

import torch

from .errors import NumericalError
from .kernels.obs import block_mask, find_quant_grid, lowest_k_mask, obs_prune, quantize
from .sparsity import Sparsity

DAMPING_STEPS = (1, 10, 100, 1000, 10000)  # multiples of percdamp tried in turn


@dataclass
class SolveInfo:
    damping: list[float] = field(default_factory=list)  # damping used per matrix (fraction of mean diag)
    dead_inputs: list[int] = field(default_factory=list)


@dataclass
class HessianFactor:
    """What SparseGPT needs of a Hessian; computed once and shared by the linears of a group."""
    Hinv: torch.Tensor        # [E, C, C] upper Cholesky factor of (H + λI)⁻¹
    dead: torch.Tensor        # [E, C] inputs with a zero diagonal
    damping: list[float]      # λ / mean(diag H) used per matrix


def prune_scores(score: torch.Tensor, sparsity: Sparsity, per_row: bool) -> torch.Tensor:
    """Kept mask [E, R, C] that removes the lowest scores: per matrix, per row, or N of every M."""
    E, R, C = score.shape
    pruned = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if sparsity.structured:
        groups = score.reshape(E, R, C // sparsity.m, sparsity.m)
        idx = torch.topk(groups, sparsity.n, dim=-1, largest=False).indices
        pruned.view(E, R, C // sparsity.m, sparsity.m).scatter_(-1, idx, True)
    elif per_row:
        pruned = lowest_k_mask(score.reshape(E * R, C), int(C * sparsity.rate)).view(E, R, C)
    else:
        pruned = lowest_k_mask(score.reshape(E, R * C), int(R * C * sparsity.rate)).view(E, R, C)
    return ~pruned


def _round_kept(W: torch.Tensor, bits: int | None) -> torch.Tensor:
    if bits is None:
        return W
    grid = find_quant_grid(W, bits)
    return quantize(W, grid.scale, grid.zero, grid.maxq)


def magnitude(W: torch.Tensor, sparsity: Sparsity, bits: int | None = None) -> torch.Tensor:
    """Drop the smallest |w| of each matrix (N:M: of each group); kept weights optionally rounded."""
    W = W.float()
    return torch.where(prune_scores(W.abs(), sparsity, per_row=False), _round_kept(W, bits), 0.0)


def wanda(W: torch.Tensor, H: torch.Tensor, sparsity: Sparsity, bits: int | None = None) -> torch.Tensor:
    """Wanda: score |w_ij|·‖x_j‖₂ compared within each output row (N:M: within each group).

    ‖x_j‖ is read off the Hessian diagonal (‖x_j‖² = n/2·H_jj; the constant does not change ranks).
    """
    W = W.float()
    col_norm = torch.diagonal(H, dim1=1, dim2=2).clamp(min=0).sqrt()  # [E, C]
    return torch.where(prune_scores(W.abs() * col_norm[:, None, :], sparsity, per_row=True), _round_kept(W, bits), 0.0)


def inverse_hessian_factor(H: torch.Tensor, percdamp: float = 0.01, name: str = "layer",
                           in_place: bool = False) -> HessianFactor:
    """Upper Cholesky factor of (H + λI)⁻¹ per matrix, with λ = damp·mean(diag H).

    Dead inputs (zero diagonal) get H_jj = 1 so that the factorisation exists; the caller zeros
    their weights. The damping starts at `percdamp` and is raised step by step for each matrix
    whose factorisation fails. `in_place`: work in H itself (fp32) instead of a copy; H holds
    its own values again on return. Besides H, at most three [E, C, C] tensors are live at once.
    """
    if not in_place:
        return inverse_hessian_factor(H.float().clone(), percdamp, name, in_place=True)
    diag = torch.diagonal(H, dim1=1, dim2=2)
    dead = diag == 0
    diag[dead] = 1.0
    try:
        return _factor(H, diag.mean(dim=1), dead, percdamp, name)
    finally:
        diag[dead] = 0.0  # exactly as given


def _factor(H: torch.Tensor, mean_diag: torch.Tensor, dead: torch.Tensor, percdamp: float, name: str
            ) -> HessianFactor:
    E = H.shape[0]
    Hinv = None
    used = [float("nan")] * E
    todo = list(range(E))
    for step in DAMPING_STEPS:
        damp = percdamp * step
        U, info = upper_inverse_factor(H if len(todo) == E else H[todo], damp * mean_diag[todo])
        ok = (info == 0) & torch.isfinite(U).flatten(1).all(dim=1)
        if Hinv is None and bool(ok.all()):  # every matrix at the first try: U is the factor
            return HessianFactor(U, dead, [damp] * E)
        if Hinv is None:
            Hinv = torch.empty_like(H)
        for j, e in enumerate(todo):
            if ok[j]:
                Hinv[e] = U[j]
                used[e] = damp
        del U
        todo = [e for j, e in enumerate(todo) if not ok[j]]
        if not todo:
            return HessianFactor(Hinv, dead, used)
    raise NumericalError(f"{name}: the Hessian does not factor even with damping {percdamp * DAMPING_STEPS[-1]:g} "
                         f"x mean diagonal; check the layer's inputs for NaN/inf or use more calibration tokens")


def upper_inverse_factor(H: torch.Tensor, damping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, info): the upper Cholesky factor of (H + λI)⁻¹ per matrix of H [E, C, C] (λ = damping
    [E]), with the Cholesky's info (0: factored). With P the reversal of the C indices,
    P(H + λI)P = LLᵀ gives (H + λI)⁻¹ = UᵀU for U = P L⁻¹ P, upper triangular: one Cholesky
    (C³/3) and one triangular inverse in matrix products (2/3·C³), where inverting H and factoring
    the inverse again takes 4/3·C³ in slower LAPACK calls. Besides H, at most three [E, C, C]
    tensors are live at once."""
    Hd = torch.flip(H, (1, 2))
    torch.diagonal(Hd, dim1=1, dim2=2).add_(damping[:, None])
    L, info = torch.linalg.cholesky_ex(Hd)
    del Hd
    return torch.flip(lower_triangular_inverse(L), (1, 2)), info


def lower_triangular_inverse(L: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """L⁻¹ of lower-triangular L [E, n, n] by halves, [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹BA⁻¹, C⁻¹]]:
    the work is in matrix products (torch has no triangular inverse; a triangular solve against
    the identity costs n³, this 2/3·n³). Blocks of at most `leaf` rows are solved directly."""
    n = L.shape[-1]
    if n <= leaf:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device).expand_as(L), upper=False)
    h = n // 2
    out = torch.empty_like(L)
    out[:, :h, h:] = 0.0
    out[:, :h, :h] = lower_triangular_inverse(L[:, :h, :h], leaf)
    out[:, h:, h:] = lower_triangular_inverse(L[:, h:, h:], leaf)
    out[:, h:, :h] = (out[:, h:, h:] @ (L[:, h:, :h] @ out[:, :h, :h])).neg_()
    return out


def sparsegpt(W: torch.Tensor, H: torch.Tensor | HessianFactor, sparsity: Sparsity, bits: int | None = None,
              blocksize: int = 128, percdamp: float = 0.01, name: str = "layer", select=block_mask
              ) -> tuple[torch.Tensor, SolveInfo]:
    """SparseGPT (Frantar & Alistarh, 2023) on E matrices [E, R, C] with Hessians [E, C, C]
    (or their `inverse_hessian_factor`, when several linears share one input). `select`: how
    an unstructured block's mask is chosen from its scores (see kernels.obs.obs_prune)."""
    source, W = W, W.float().contiguous()
    if W.data_ptr() == source.data_ptr():  # the caller's own storage: work on a copy
        W = W.clone()
    f = H if isinstance(H, HessianFactor) else inverse_hessian_factor(H, percdamp, name)
    W[f.dead[:, None, :].expand_as(W)] = 0.0
    grid = find_quant_grid(W, bits) if bits is not None else None
    W, _ = obs_prune(W, f.Hinv, sparsity.rate if not sparsity.structured else 0.0,
                     sparsity.n, sparsity.m, grid, blocksize, select, in_place=True)  # W: already our copy
    return W, SolveInfo(damping=f.damping, dead_inputs=f.dead.sum(dim=1).tolist())


# refine_on_mask's transients per weight of the rows it holds (residual, z, direction, step and one
# product in fp32; the mask), and how many rows of a matrix it re-solves at a time
REFINE_BYTES_PER_WEIGHT = 5 * 4 + 1
REFINE_ROWS = 1024


def refine_on_mask(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, damping: list[float],
                   iterations: int) -> torch.Tensor:
    """SparseGPT's weights re-solved on their own mask, in place: `iterations` steps of conjugate
    gradients (Jacobi preconditioner, each row its own step sizes) on the objective SparseGPT
    solves, tr((Ŵ − W)(H + λI)(Ŵ − W)ᵀ) with the damping λ = damping[e]·mean(diag H) it factored
    with, started at its solution. SparseGPT fixes each column's update when the column is
    reached and never revisits it once later columns are pruned; the exact minimiser on the same
    mask is lower. The weights it pruned stay exactly 0.

    W [E or 1, R, C] the dense weights, W_hat [E, R, C] fp32 pruned, H [E, C, C]. One matrix and
    REFINE_ROWS rows at a time: the transients are REFINE_BYTES_PER_WEIGHT per weight of those rows."""
    R = W_hat.shape[1]
    for e in range(W_hat.shape[0] if iterations > 0 else 0):
        h = H[e].float()
        diag = torch.diagonal(h).clone()
        diag[diag == 0] = 1.0  # dead inputs, as the factor treats them (their weights are 0)
        lam = damping[e] * float(diag.mean())
        precond = 1.0 / (diag + lam)
        for r in range(0, R, REFINE_ROWS):  # rows are independent: bounded transients
            rows = slice(r, min(r + REFINE_ROWS, R))
            _refine_rows(W_hat[e, rows], W[min(e, W.shape[0] - 1), rows].float(), h, lam, precond, iterations)
    return W_hat


def _refine_rows(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, lam: float, precond: torch.Tensor,
                 iterations: int) -> None:
    """refine_on_mask on rows x [r, C] (in place) of one matrix; w its dense rows."""
    kept = x != 0
    delta = x - w
    residual = (delta @ h).add_(delta, alpha=lam).mul_(kept).neg_()  # − the objective's gradient / 2
    del delta
    z = residual * precond
    direction = z.clone()
    rz = (residual * z).sum(1, keepdim=True)
    for _ in range(iterations):
        step = (direction @ h).add_(direction, alpha=lam).mul_(kept)
        alpha = rz / (direction * step).sum(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        x.addcmul_(alpha, direction)
        residual.addcmul_(alpha, step, value=-1.0)
        torch.mul(residual, precond, out=z)
        rz_next = (residual * z).sum(1, keepdim=True)
        direction.mul_(rz_next / rz.clamp(min=torch.finfo(torch.float32).tiny)).add_(z)
        rz = rz_next


def error_terms(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tr(ΔW H ΔWᵀ), tr(W H Wᵀ)) per matrix: ‖(W − Ŵ)X‖² and ‖WX‖² up to the factor n/2.
    One matrix at a time, so that the transients are [R, C], not [E, R, C]. Experts of one
    weight (W [1, R, C]) share WᵀW: tr(W H_e Wᵀ) = ⟨WᵀW, H_e⟩, C² work each."""
    W = W.float()
    H = H.expand(W_hat.shape[0], -1, -1)
    gram = W[0].t() @ W[0] if W.shape[0] == 1 else None  # the same arithmetic for any chunk of experts
    num, den = [], []
    for e, (w_hat, h) in enumerate(zip(W_hat, H)):
        w = W[min(e, W.shape[0] - 1)]
        d = w - w_hat.float()
        num.append(((d @ h) * d).sum())
        den.append((gram * h).sum() if gram is not None else ((w @ h) * w).sum())
    return torch.stack(num), torch.stack(den)


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> list[float]:
    """‖WX − ŴX‖² / ‖WX‖² per matrix, computed from H ∝ XᵀX (no activations needed)."""
    num, den = error_terms(W, W_hat, H)
    return (num / den.clamp(min=torch.finfo(torch.float32).tiny)).tolist()
