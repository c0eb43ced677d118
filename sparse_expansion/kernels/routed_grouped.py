"""Top-1 routed expert matmul on dense experts as one grouped GEMM (`torch._grouped_mm`): the
tokens are sorted by expert once, one call multiplies every expert's contiguous rows by its
weight, and the rows are scattered back to token order. Same arguments and result as
`routed_matmul.routed_matmul_reference`; no host synchronisation (the group ends are a
`scatter_add` and a cumulative sum on the device).

An alternative to the Triton kernel for prefill (many tokens per expert), where the grouped GEMM
is a vendor kernel (CUTLASS on sm_90 in bf16). `benchmarks/kernel_speed.py` times both on the same
shapes; nothing dispatches to it until a GPU measurement says it is faster.
"""
import torch


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this torch runs `torch._grouped_mm` for these operands: rows of whole 16-byte units
    (d_in; on CUDA d_out too), on the CPU in any float dtype, on CUDA in bf16 on sm_90 or newer
    (the CUTLASS path)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype or not x.dtype.is_floating_point:
        return False
    E, N, K = weight.shape
    unit = 16 // x.element_size()
    if x.device.type == "cpu":
        return K % unit == 0
    return (x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
            and K % unit == 0 and N % unit == 0)


def routed_matmul_grouped(x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, d_in]; expert: [T] ints in [0, E); weight: [E, d_out, d_in]; bias: [E, d_out].
    Output [T, d_out] in x.dtype."""
    E = weight.shape[0]
    order = torch.argsort(expert, stable=True)
    sorted_expert = expert[order]
    ones = torch.ones_like(expert, dtype=torch.int32)
    ends = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(0, expert, ones).cumsum(0, dtype=torch.int32)
    # [E, d_in, d_out] as a transposed view: the column-major second operand the CUDA kernel reads
    ys = torch._grouped_mm(x[order].contiguous(), weight.transpose(1, 2), offs=ends)
    if bias is not None:
        ys = ys + bias[sorted_expert].to(ys.dtype)
    out = torch.empty_like(ys)
    out[order] = ys
    return out.to(x.dtype)
