"""The core maths against independent textbook computations written here, on small problems."""
import math

import pytest
import torch

from sparse_expansion import solvers
from sparse_expansion.evaluate import perplexity
from sparse_expansion.methods.expansion.stages import solve_hessians
from sparse_expansion.kernels.hessian import accumulate_hessian, complete_hessian
from sparse_expansion.kernels.routed_matmul import compress_24
from sparse_expansion.methods.expansion.router import Router
from sparse_expansion.sparsity import Sparsity
from tiny import random_tokens, tiny_model


def problem(R=12, C=40, N=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, C, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, C, dtype=torch.float64)
    W = torch.randn(R, C, generator=g, dtype=torch.float64)
    return W, X


def textbook_sparsegpt(W, X, rate=0.0, n=0, m=0, blocksize=16, percdamp=0.01):
    """SparseGPT as written in the paper, one matrix, float64: H = 2/N XᵀX + λI; Hinv the upper
    Cholesky factor of H⁻¹; each block's unstructured mask = the k = int(R·B·rate) lowest w²/[Hinv]_jj²
    at the block's start (N:M: the n lowest of every m columns when the loop reaches them); then,
    column by column, zero the pruned weights and push the error into ALL later columns."""
    W = W.clone()
    R, C = W.shape
    H = 2.0 / X.shape[0] * X.t() @ X
    H += percdamp * H.diagonal().mean() * torch.eye(C, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    pruned = torch.zeros(R, C, dtype=torch.bool)
    for b in range(0, C, blocksize):
        e = min(b + blocksize, C)
        if not n:
            score = W[:, b:e] ** 2 / Hinv.diagonal()[b:e] ** 2
            k = int(score.numel() * rate)
            block = torch.zeros(score.numel(), dtype=torch.bool)
            block[score.flatten().argsort()[:k]] = True
            pruned[:, b:e] = block.view(score.shape)
        for j in range(b, e):
            if n and (j - b) % m == 0:
                score = W[:, j:j + m] ** 2 / Hinv.diagonal()[j:j + m] ** 2
                low = score.argsort(dim=1)[:, :n]
                pruned[:, j:j + m].scatter_(1, low, True)
            q = torch.where(pruned[:, j], torch.zeros_like(W[:, j]), W[:, j])
            err = (W[:, j] - q) / Hinv[j, j]
            W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
            W[:, j] = q
    return W, ~pruned


@pytest.mark.parametrize("pattern", ["0.5", "0.3", "2:4"])
def test_sparsegpt_matches_the_textbook_column_loop(pattern):
    sp = Sparsity.parse(pattern)
    W, X = problem()
    want, kept = textbook_sparsegpt(W, X, sp.rate if not sp.structured else 0.0, sp.n, sp.m)
    H = (2.0 / X.shape[0] * X.t() @ X).float()[None]
    got, _ = solvers.sparsegpt(W.float()[None], H, sp, blocksize=16)
    assert torch.equal(got[0] != 0, kept)
    torch.testing.assert_close(got[0].double(), want, rtol=1e-4, atol=1e-4)


def test_wanda_and_magnitude_masks_match_their_definitions():
    W, X = problem(R=10, C=32)
    H = (2.0 / X.shape[0] * X.t() @ X).float()[None]
    # Wanda: within each row, prune the half with the lowest |w_ij|·‖x_j‖₂
    score = W.abs() * X.norm(dim=0)
    want = torch.ones_like(W, dtype=torch.bool)
    want.scatter_(1, score.argsort(dim=1)[:, :16], False)
    got = solvers.wanda(W.float()[None], H, Sparsity(0.5))[0]
    assert torch.equal(got != 0, want) and torch.equal(got[want], W.float()[want])
    # Wanda 2:4: the 2 lowest of every 4 consecutive inputs of a row
    groups = score.view(10, 8, 4)
    want24 = torch.ones_like(groups, dtype=torch.bool).scatter_(2, groups.argsort(dim=2)[..., :2], False).view(10, 32)
    assert torch.equal(solvers.wanda(W.float()[None], H, Sparsity.parse("2:4"))[0] != 0, want24)
    # magnitude: the lowest |w| of the whole matrix
    flat = W.abs().flatten()
    want_mag = torch.ones(flat.numel(), dtype=torch.bool)
    want_mag[flat.argsort()[:int(0.7 * flat.numel())]] = False
    assert torch.equal(solvers.magnitude(W.float()[None], Sparsity(0.7))[0].flatten() != 0, want_mag)


def test_cluster_hessians_are_two_over_n_xtx_of_each_cluster():
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(150, 9, generator=g), torch.randint(0, 4, (150,), generator=g)
    labels[labels == 3] = 2  # cluster 3 stays empty
    H, counts = torch.zeros(4, 9, 9), torch.zeros(4, dtype=torch.long)
    for xb, lb in zip(x.split(37), labels.split(37)):
        accumulate_hessian(H, counts, xb, lb)
    complete_hessian(H)
    for c in range(4):
        xc = x[labels == c].double()
        assert counts[c] == xc.shape[0]
        want = 2.0 / max(xc.shape[0], 1) * xc.t() @ xc
        torch.testing.assert_close(H[c].double(), want, rtol=1e-5, atol=1e-5)
    # the token-weighted mean of the cluster Hessians is the layer's Hessian (shrink's target)
    full = torch.einsum("k,kij->ij", counts.double(), H.double()) / 150
    torch.testing.assert_close(full, 2.0 / 150 * x.double().t() @ x.double(), rtol=1e-5, atol=1e-5)


def test_shrink_rule_is_the_token_weighted_mean_with_the_layer_hessian():
    g = torch.Generator().manual_seed(2)
    H_c = torch.randn(3, 5, 5, generator=g)
    H_full = torch.randn(1, 5, 5, generator=g)
    counts = torch.tensor([10, 0, 300])
    tau = 100.0
    got = solve_hessians(H_c, counts, H_full, "shrink", tau)
    torch.testing.assert_close(got[0], (10 * H_c[0] + tau * H_full[0]) / (10 + tau))
    torch.testing.assert_close(got[2], (300 * H_c[2] + tau * H_full[0]) / (300 + tau))
    assert torch.equal(got[1], H_full[0])  # an empty cluster takes the layer's Hessian
    damping = solve_hessians(H_c, counts, H_full, "damping", tau)
    assert torch.equal(damping[0], H_c[0]) and torch.equal(damping[1], H_full[0])
    rank_aware = solve_hessians(H_c, counts, H_full, "shrink", None)  # tau = the input dimension
    torch.testing.assert_close(rank_aware[0], (10 * H_c[0] + 5 * H_full[0]) / (10 + 5))


def test_routing_is_the_nearest_centroid_of_the_pca_projection():
    g = torch.Generator().manual_seed(3)
    mean, basis = torch.randn(16, generator=g), torch.linalg.qr(torch.randn(16, 4, generator=g)).Q
    centroids = torch.randn(6, 4, generator=g) * 2
    x = torch.randn(500, 16, generator=g)
    want = torch.cdist((x - mean) @ basis, centroids).argmin(dim=1)
    assert torch.equal(Router(centroids, mean, basis).assign(x), want)
    no_pca = Router(x[:5].clone())
    assert torch.equal(no_pca.assign(x), torch.cdist(x, x[:5]).argmin(dim=1))


def test_24_compression_refuses_a_group_with_three_nonzeros():
    w = torch.zeros(1, 2, 8)
    w[0, 0, :2] = 1.0
    w[0, 1, 4:7] = 1.0  # three nonzeros in one group of four
    with pytest.raises(ValueError, match="not 2:4 sparse: 1 groups"):
        compress_24(w)
    w[0, 1, 6] = 0.0
    compress_24(w)


def test_perplexity_is_exp_of_the_mean_next_token_nll():
    model = tiny_model("llama")
    windows = random_tokens(3, 10)
    result = perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits.double(), dim=-1)
    nll = [-logp[w, t, windows[w, t + 1]] for w in range(3) for t in range(9)]
    mean = float(sum(nll) / len(nll))
    assert result["tokens"] == 27 and result["windows"] == 3 and result["seqlen"] == 10
    assert result["nll"] == pytest.approx(mean, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)
