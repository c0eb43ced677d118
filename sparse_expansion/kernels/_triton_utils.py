"""Small helpers shared by the Triton kernels: launch checks, dot precision, block sizes."""
import functools

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

_INTERPRET_HINT = ("Triton kernels run on CPU tensors only through the interpreter: set "
                   "TRITON_INTERPRET=1 before importing sparse_expansion.kernels")


def interpreted(kernel) -> bool:
    """True when `kernel` (a @triton.jit function) runs under TRITON_INTERPRET."""
    return isinstance(kernel, InterpretedFunction)


def check_launch(kernel, *tensors: torch.Tensor) -> None:
    """Raise a clear error instead of letting Triton fail on CPU tensors or mixed devices."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if not interpreted(kernel) and any(not t.is_cuda for t in tensors if t is not None):
        raise RuntimeError(_INTERPRET_HINT)


def check_interpreted_dot(kernel, *operands: torch.Tensor) -> None:
    """Refuse bf16 operands of a `tl.dot` under the interpreter: it computes them wrongly (a 32x32
    bf16 product comes out off by ~5e10 under triton 3.8; fp16 and fp32 are exact), and a wrong
    result must not pass for a kernel's."""
    if interpreted(kernel) and any(t is not None and t.dtype == torch.bfloat16 for t in operands):
        raise RuntimeError("Triton's interpreter computes bf16 tl.dot wrongly; run this kernel on a GPU, or give "
                           "it float16 or float32 inputs under TRITON_INTERPRET")


IEEE_FP32_ARCHS = (86, 89)  # GeForce Ampere/Ada: TF32 tensor cores run at the FMA units' fp32 rate


def fp32_dot_precision(capability: int) -> str:
    """How an fp32 `tl.dot` keeps fp32 accuracy on a GPU of compute capability `capability` (e.g.
    90): "tf32x3", three TF32 tensor-core products that recover fp32's 24-bit mantissa (within
    fp32 rounding of torch's fp32 results), where TF32 runs at 8x (A100) to 7x (H100/H200) the
    fp32 FMA rate; "ieee" (the FMA units) on sm_86/89, whose TF32 rate equals the FMA rate, so
    that three products would take 3x as long."""
    return "ieee" if capability in IEEE_FP32_ARCHS else "tf32x3"


def dot_precision(dtype: torch.dtype, device: torch.device | None = None) -> str:
    """`tl.dot` input precision for operands of `dtype` on `device`. fp32 follows torch's matmul
    TF32 flag: off (the default) keeps fp32 accuracy (`fp32_dot_precision`), on gives plain
    "tf32". 16-bit types ignore it; so does the interpreter."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        if device is None or device.type != "cuda":
            return "tf32x3"
        return fp32_dot_precision(capability(device))
    return "tf32"


def next_pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return min(p, hi) if hi is not None else p


@functools.lru_cache(maxsize=16)
def capability(device: torch.device) -> int:
    """Compute capability of a CUDA device as one number (90 for sm_90); 80 elsewhere, the
    oldest target the kernels are tuned for (off a GPU, only tests ask)."""
    if device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
