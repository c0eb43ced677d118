import pytest
import torch

from sparse_expansion import solvers
from sparse_expansion.kernels.hessian import accumulate_hessian, complete_hessian
from sparse_expansion.kernels.obs import find_quant_grid
from sparse_expansion.sparsity import Sparsity


def hessian_of(x):
    H = torch.zeros(1, x.shape[1], x.shape[1])
    n = torch.zeros(1, dtype=torch.long)
    accumulate_hessian(H, n, x)
    return complete_hessian(H)


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(1, 37, 300, generator=g)
    # correlated inputs with a decaying spectrum, as in a real layer
    x = torch.randn(2000, 300, generator=g) @ (torch.randn(300, 300, generator=g) * torch.logspace(0, -0.5, 300))
    return W, hessian_of(x)


def test_hessian_is_running_average_of_2_over_n_xtx():
    x = torch.randn(50, 7)
    H = torch.zeros(1, 7, 7)
    n = torch.zeros(1, dtype=torch.long)
    for chunk in x.split(13):
        accumulate_hessian(H, n, chunk)
    complete_hessian(H)
    assert n.item() == 50
    torch.testing.assert_close(H[0], 2 / 50 * x.t() @ x, rtol=1e-5, atol=1e-5)


def test_sparsegpt_with_identity_hessian_is_blockwise_magnitude():
    W = torch.randn(1, 20, 300)
    H = torch.eye(300)[None]
    W_hat, _ = solvers.sparsegpt(W, H, Sparsity(0.5), blocksize=128)
    expected = torch.zeros_like(W)
    for i1 in range(0, 300, 128):
        blk = W[:, :, i1:i1 + 128]
        expected[:, :, i1:i1 + 128] = solvers.magnitude(blk, Sparsity(0.5))
    torch.testing.assert_close(W_hat, expected)


@pytest.mark.parametrize("spec", ["0.5", "0.3", "0.9", "2:4", "1:3", "3:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_sparsity_and_nm_pattern(layer, spec, method):
    W, H = layer
    sp = Sparsity.parse(spec)
    if sp.structured and W.shape[2] % sp.m:
        pytest.skip("columns not divisible")
    if method == "magnitude":
        W_hat = solvers.magnitude(W, sp)
    elif method == "wanda":
        W_hat = solvers.wanda(W, H, sp)
    else:
        W_hat, _ = solvers.sparsegpt(W, H, sp)
    zeros = W_hat == 0
    if sp.structured:
        per_group = zeros.reshape(1, W.shape[1], -1, sp.m).sum(-1)
        assert (per_group == sp.n).all()
    elif method == "wanda":
        assert (zeros.sum(-1) == int(W.shape[2] * sp.rate)).all()
    elif method == "magnitude":
        assert zeros.sum() == int(W.numel() * sp.rate)
    else:  # the rate holds exactly within each 128-column block
        expected = sum(int(W.shape[1] * min(128, W.shape[2] - i) * sp.rate) for i in range(0, W.shape[2], 128))
        assert zeros.sum() == expected


def test_sparsegpt_beats_magnitude_and_wanda_on_correlated_inputs(layer):
    W, H = layer
    sp = Sparsity(0.5)
    err = {m: solvers.relative_error(W, W_hat, H)[0] for m, W_hat in [
        ("magnitude", solvers.magnitude(W, sp)), ("wanda", solvers.wanda(W, H, sp)),
        ("sparsegpt", solvers.sparsegpt(W, H, sp)[0])]}
    assert err["sparsegpt"] < err["wanda"] and err["sparsegpt"] < err["magnitude"], err


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_kept_weights_lie_on_the_grid(layer, bits):
    W, H = layer
    W_hat, _ = solvers.sparsegpt(W, H, Sparsity(0.5), bits=bits)
    grid = find_quant_grid(W, bits)
    levels = W_hat / grid.scale + grid.zero
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.min() >= -1e-3 and levels.max() <= 2 ** bits - 1 + 1e-3
    assert (W_hat == 0).float().mean() >= 0.5


def test_dead_inputs_are_zeroed_and_damping_is_reported():
    x = torch.randn(500, 40)
    x[:, 3] = 0
    H = hessian_of(x)
    W_hat, info = solvers.sparsegpt(torch.randn(1, 8, 40), H, Sparsity(0.25))
    assert (W_hat[0, :, 3] == 0).all()
    assert info.dead_inputs == [1] and info.damping == [0.01]


def test_damping_is_raised_for_an_indefinite_hessian():
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5]))[None]  # fails at 1 % damping
    _, info = solvers.sparsegpt(torch.randn(1, 4, 4), H, Sparsity(0.5))
    assert info.damping[0] > 0.01


def test_batched_sparsegpt_equals_one_matrix_at_a_time(layer):
    W, H = layer
    W2 = torch.cat([W, W.flip(1)])
    H2 = torch.cat([H, H + torch.eye(300)])
    batched, _ = solvers.sparsegpt(W2, H2, Sparsity(0.5))
    for e in range(2):
        single, _ = solvers.sparsegpt(W2[e:e + 1], H2[e:e + 1], Sparsity(0.5))
        torch.testing.assert_close(batched[e:e + 1], single, rtol=1e-4, atol=1e-5)


def _objective(W, W_hat, H, damping):
    """tr((Ŵ − W)(H + λI)(Ŵ − W)ᵀ) per matrix, λ = damping · mean(diag H)."""
    out = []
    for e in range(W_hat.shape[0]):
        h = H[e] + damping[e] * torch.diagonal(H[e]).mean() * torch.eye(H.shape[-1])
        d = W_hat[e] - W[0]
        out.append(float(((d @ h) * d).sum()))
    return out


@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_refine_on_mask_reaches_the_exact_minimiser_on_sparsegpts_mask(layer, spec):
    W, H = layer
    W, H = W[:, :9, :40], H[:, :40, :40]  # small enough for an exact solve per row
    H = torch.cat([H, H * torch.linspace(0.5, 2, 40)]).contiguous()  # two matrices, two Hessians
    factor = solvers.inverse_hessian_factor(H, 0.01)
    W_hat, info = solvers.sparsegpt(W.expand(2, -1, -1), factor, Sparsity.parse(spec))
    kept = W_hat != 0
    before = _objective(W, W_hat, H, info.damping)
    refined = solvers.refine_on_mask(W, W_hat.clone(), H, info.damping, 30)
    after = _objective(W, refined, H, info.damping)
    assert torch.equal(refined != 0, kept)  # the mask is SparseGPT's, pruned weights exactly 0
    exact = []
    for e in range(2):  # per row: w_S + H_SS⁻¹ H_S,~S w_~S minimises (x − w) H (x − w)ᵀ with x_~S = 0
        h = H[e] + info.damping[e] * torch.diagonal(H[e]).mean() * torch.eye(40)
        total = 0.0
        for r in range(W.shape[1]):
            S, w = kept[e, r], W[0, r]
            x = torch.zeros(40)
            x[S] = w[S] + torch.linalg.solve(h[S][:, S], h[S][:, ~S] @ w[~S])
            total += float((x - w) @ h @ (x - w))
        exact.append(total)
    for b, a, x in zip(before, after, exact):
        assert a < b and a == pytest.approx(x, rel=1e-4), (b, a, x)


def test_refine_on_mask_lowers_the_error_step_by_step(layer):
    W, H = layer
    W_hat, info = solvers.sparsegpt(W, H, Sparsity(0.5))
    errors = [solvers.relative_error(W, solvers.refine_on_mask(W, W_hat.clone(), H, info.damping, k), H)[0]
              for k in (0, 1, 3, 10)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("n", [1, 37, 300])
def test_upper_inverse_factor_is_the_cholesky_factor_of_the_inverse(n):
    """U = P·chol(P(H + λI)P)⁻¹·P: upper triangular and UᵀU = (H + λI)⁻¹, as the float64 factor of
    the inverse gives it (leaf 16: the halving recursion runs on sizes that do not divide)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(4 * n + 8, n, generator=g) * torch.logspace(0, -1, n)
    H = torch.stack([x.t() @ x / x.shape[0], torch.eye(n)])
    damping = torch.tensor([0.01, 0.5])
    U, info = solvers.upper_inverse_factor(H, damping)
    assert info.tolist() == [0, 0] and torch.equal(U, U.triu())
    H64 = H.double() + damping.double()[:, None, None] * torch.eye(n, dtype=torch.float64)
    L = torch.linalg.cholesky(H64)
    want = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # the factor as SparseGPT computes it
    torch.testing.assert_close(U.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    eye = torch.eye(n, dtype=torch.float64).expand_as(L)
    torch.testing.assert_close(solvers.lower_triangular_inverse(L, leaf=16),
                               torch.linalg.solve_triangular(L, eye, upper=False))


def test_factor_reports_an_unfactorable_matrix():
    """A matrix that is not positive definite gives info > 0 (the damping steps then retry it)."""
    H = torch.stack([torch.eye(5), -torch.eye(5)])
    _, info = solvers.upper_inverse_factor(H, torch.zeros(2))
    assert info[0] == 0 and info[1] > 0
