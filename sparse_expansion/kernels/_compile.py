"""Ahead-of-time compilation of every kernel for a CUDA target, without a GPU.

`compile_all(cc)` builds each kernel variant with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))` down to a cubin (Triton ships ptxas), specialised as the JIT
specialises a launch at LLM shapes: pointers and integer arguments divisible by 16 carry the
`tt.divisibility` hint, unit strides become the constant 1 (`Variant.unit`), and arguments that
vary per call (token counts) carry no hint (`Variant.free`). Each result says what the compiled
code uses: registers, spill bytes (ptxas -v), shared memory, and tensor-core instructions
(mma.sync on sm_80/86, wgmma on sm_90) in the PTX. It is the cheap check, run by the CPU test
suite, that the kernels the interpreter tests also lower for sm_80/86/90 with 16-bit inputs (the
interpreter accepts some programs the compiler rejects, and vice versa), and the record of what
the compiled code looks like while no GPU is lent.

It must run in a process without TRITON_INTERPRET: under the interpreter Triton's own library
functions (tl.sum's combine function, ...) are interpreter objects that the compiler cannot
lower, and calling them patches triton.language for good. From an interpreted process run
`python -m sparse_expansion.kernels._compile 80 86 90` with TRITON_INTERPRET unset.
"""
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import triton
import triton.backends.nvidia as nvidia_backend
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from ._triton_utils import fp32_dot_precision
from .hessian import _hessian_blocks, _hessian_tile_kernel
from .obs import TRAILING_BLOCKS, _obs_block_kernel, _trailing_kernel, obs_sub_block
from .routed_matmul import _gemv_24_kernel, _routed_kernel, gpu_configs

_TY = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROUTED_UNIT = ("stride_xk", "stride_wk", "stride_yn")  # contiguous activations, weights, outputs


@dataclass
class Variant:
    name: str
    kernel: object
    signature: dict
    constexprs: dict
    options: dict = field(default_factory=dict)
    unit: tuple = ()  # integer arguments that are 1 at every launch (innermost strides)
    free: tuple = ()  # integer arguments with no divisibility at some launches (token counts)

    def specialised(self) -> tuple[dict, dict, dict]:
        """(signature, constexprs, attrs) as the JIT builds them for a launch at LLM shapes."""
        names = _jit(self.kernel).arg_names
        signature, constexprs, attrs = dict(self.signature), dict(self.constexprs), {}
        for name, kind in self.signature.items():
            if name in self.unit:
                signature[name], constexprs[name] = "constexpr", 1
            elif kind.startswith("*") or (kind in ("i32", "i64") and name not in self.free):
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        return signature, constexprs, attrs


def _jit(kernel) -> JITFunction:
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("kernels cannot be compiled in a TRITON_INTERPRET process: run "
                           "`python -m sparse_expansion.kernels._compile` without it")
    return kernel


def variants(dtype: str = "bf16", cc: int = 90) -> list[Variant]:
    """Every kernel variant the wrappers launch on a GPU of compute capability `cc`, with `dtype`
    activations/weights (OBS's weights are fp32 whatever the model's dtype)."""
    t = _TY[dtype]
    fp32 = fp32_dot_precision(cc)  # dot_precision's choice with TF32 off
    prec = fp32 if t == "fp32" else "tf32"
    out = []
    hsig = {"X": f"*{t}", "OFFS": "*i32", "COUNTS": "*i64", "PAIR_I": "*i32",
            "PAIR_J": "*i32", "H": "*fp32", "d": "i32",
            "stride_xn": "i32", "stride_xd": "i32", "BLOCK": "constexpr", "BLOCK_K": "constexpr", "PREC": "constexpr",
            "PRELOAD": "constexpr"}
    blocks = _hessian_blocks(4096, TORCH_DTYPE[t], False, cc)  # the blocks of a d = 4096 launch
    warps, stages = blocks.pop("num_warps"), blocks.pop("num_stages")
    out.append(Variant("hessian", _hessian_tile_kernel, hsig, dict(PREC=prec, **blocks),
                       dict(num_warps=warps, num_stages=stages), unit=("stride_xd",)))
    osig = {"W": "*fp32", "PRUNED": "*u8", "HINV": "*fp32", "ERR": "*fp32", "SCALE": "*fp32",
            "ZERO": "*fp32", "R": "i32", "C": "i32", "i1": "i32", "count": "i32", "maxq": "fp32",
            "stride_we": "i64", "stride_wr": "i32", "stride_pe": "i64", "stride_pr": "i32",
            "stride_ee": "i64", "stride_er": "i32", "PRUNE_N": "constexpr",
            "PRUNE_M": "constexpr", "QUANT": "constexpr", "BLOCK_R": "constexpr",
            "BLOCK_C": "constexpr", "SUB": "constexpr", "PREC": "constexpr"}
    for n, m, quant in ((0, 1, False), (2, 4, False), (0, 1, True), (2, 4, True)):
        out.append(Variant(f"obs[{n}:{m},quant={quant}]", _obs_block_kernel, osig,
                           dict(PRUNE_N=n, PRUNE_M=m, QUANT=quant, BLOCK_R=16, BLOCK_C=128,
                                SUB=obs_sub_block(128, m), PREC=fp32),
                           dict(num_warps=4), free=("count",)))
    tsig = {"W": "*fp32", "ERR": "*fp32", "HINV": "*fp32", "R": "i32", "C": "i32", "i1": "i32", "count": "i32",
            "i2": "i32", "stride_we": "i64", "stride_wr": "i32", "stride_ee": "i64", "stride_er": "i32",
            "stride_he": "i64", "stride_hr": "i32", "stride_hc": "i32",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "PREC": "constexpr"}
    tblocks = dict(TRAILING_BLOCKS)
    out.append(Variant("obs_trailing", _trailing_kernel, tsig,
                       dict(PREC=fp32, **{k: tblocks.pop(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}),
                       tblocks, unit=("stride_hc",), free=("i2",)))
    rsig = {"X": f"*{t}", "W": f"*{t}", "META": "*u8", "TILE_OFFSETS": "*i32", "STARTS": "*i64",
            "B": f"*{t}", "Y": f"*{t}",
            "SORTED_IDS": "*i32", "BLOCK_EXPERT": "*i64", "T": "i32", "N": "i32", "K": "i32",
            "stride_xt": "i32", "stride_xk": "i32", "stride_we": "i64", "stride_wn": "i32",
            "stride_wk": "i32", "stride_me": "i32", "stride_mn": "i32", "stride_oe": "i32", "stride_on": "i32",
            "stride_be": "i32", "stride_yt": "i32", "stride_yn": "i32", "SPARSE24": "constexpr",
            "BITMASK": "constexpr", "HAS_BIAS": "constexpr", "SPLIT_K": "constexpr", "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "PREC": "constexpr"}
    split_sig = dict(rsig, Y="*fp32")
    gsig = {"X": f"*{t}", "V": f"*{t}", "META": "*u8", "B": f"*{t}", "Y": f"*{t}", "EXPERT": "*i64",
            "N": "i32", "K": "i32", "stride_xt": "i32", "stride_ve": "i64", "stride_vn": "i32",
            "stride_me": "i32", "stride_mn": "i32", "stride_be": "i32", "stride_yt": "i32",
            "HAS_BIAS": "constexpr", "SPLIT_K": "constexpr", "EVEN": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    for fmt in ("dense", "2:4", "bitmask"):  # the configurations routed_matmul.default_config picks on a GPU
        tag = "24" if fmt == "2:4" else fmt
        configs = gpu_configs(fmt, TORCH_DTYPE[t].itemsize, cc)
        configs["decode,split"] = replace(configs["decode"], SPLIT_K=4)  # split-K: fp32 partial sums
        if "gemv" in configs:
            c = configs.pop("gemv")
            for name, split, even in (("gemv", 1, True), ("gemv,split", 4, True), ("gemv,masked", 1, False)):
                out.append(Variant(f"routed_{tag}[{name}]", _gemv_24_kernel,
                                   dict(gsig, Y="*fp32") if split > 1 else gsig,
                                   dict(HAS_BIAS=True, SPLIT_K=split, EVEN=even, BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K),
                                   dict(num_warps=c.num_warps, num_stages=c.num_stages)))
        for name, c in configs.items():
            out.append(Variant(f"routed_{tag}[{name}]", _routed_kernel, split_sig if c.SPLIT_K > 1 else rsig,
                               dict(SPARSE24=fmt == "2:4", BITMASK=fmt == "bitmask", HAS_BIAS=True,
                                    SPLIT_K=c.SPLIT_K, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N,
                                    BLOCK_K=c.BLOCK_K, PREC=prec),
                               dict(num_warps=c.num_warps, num_stages=c.num_stages), unit=ROUTED_UNIT,
                               free=("T",)))
    return out


def compile_variant(v: Variant, cc: int):
    signature, constexprs, attrs = v.specialised()
    src = ASTSource(fn=_jit(v.kernel), signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=v.options)


PTXAS = Path(nvidia_backend.__file__).parent / "bin" / "ptxas"
_TENSOR_CORE = re.compile(r"^\s*(mma\.sync|wgmma\.mma_async)", re.M)


def resources(ptx: str, cc: int) -> dict:
    """Registers and spill bytes per thread (ptxas -v on the kernel's PTX), tensor-core instructions."""
    arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        log = subprocess.run([str(PTXAS), "-v", f"--gpu-name={arch}", str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    number = lambda pattern: sum(int(n) for n in re.findall(pattern, log))  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "tensor_core": len(_TENSOR_CORE.findall(ptx))}


NVDISASM = PTXAS.parent / "nvdisasm"
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_BACK = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


def main_loop(cubin: bytes) -> dict:
    """The SASS of the kernel's main loop (its longest backward branch, nvdisasm): instructions
    per iteration per warp, of which tensor-core (HMMA/HGMMA) and fp32 FMA, and the kernel's total;
    and of its innermost loop (the longest loop holding no other, e.g. OBS's column loop inside
    its sub-block loop; the main loop itself when it holds none)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(NVDISASM), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    labels, code = {}, []
    for line in sass.splitlines():
        if m := _LABEL.match(line):
            labels[m.group(1)] = len(code)
        elif m := _INSTRUCTION.match(line):
            code.append(m.group(1))
    loops = [(labels[m.group(1)], i) for i, text in enumerate(code)
             if (m := _BACK.search(text)) and labels.get(m.group(1), len(code)) < i]
    longest = max(loops, key=lambda loop: loop[1] - loop[0], default=(0, -1))
    innermost = [(a, b) for a, b in loops if not any(a <= c < d <= b and (c, d) != (a, b) for c, d in loops)]
    inner = max(innermost, key=lambda loop: loop[1] - loop[0], default=(0, -1))
    ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in code]
    body, inner_body = ops[longest[0]:longest[1] + 1], ops[inner[0]:inner[1] + 1]
    return {"instructions": len(code), "loop_instructions": len(body),
            "loop_tensor_core": sum(op.startswith(("HMMA", "HGMMA")) for op in body),
            "loop_ffma": sum(op.startswith("FFMA") for op in body),
            "inner_loop_instructions": len(inner_body),
            "inner_loop_ffma": sum(op.startswith("FFMA") for op in inner_body)}


def compile_all(cc: int, dtype: str = "bf16") -> dict[str, dict]:
    """Compile every variant for compute capability `cc`.

    Returns {variant: {"stages", "shared" (bytes), "registers", "spill_stores", "spill_loads",
    "tensor_core" (mma instructions in the PTX), "instructions", "loop_instructions",
    "loop_tensor_core", "loop_ffma", "inner_loop_instructions", "inner_loop_ffma" (SASS,
    `main_loop`), "num_warps", "dot" (the kernel calls tl.dot), "precision" (its tl.dot input
    precision; "ieee" runs on the FMA units), "error"}}.
    """
    out = {}
    for v in variants(dtype, cc):
        try:
            k = compile_variant(v, cc)
            out[v.name] = {"stages": list(k.asm.keys()), "shared": k.metadata.shared, **resources(k.asm["ptx"], cc),
                           **main_loop(k.asm["cubin"]), "num_warps": k.metadata.num_warps,
                           "dot": "tl.dot(" in _jit(v.kernel).src, "precision": v.constexprs.get("PREC"),
                           "error": None}
        except Exception as e:  # reported, the caller decides
            out[v.name] = {"stages": [], "shared": 0, "error": f"{type(e).__name__}: {e}"}
    return out


def main(argv: list[str]) -> int:
    """`python -m sparse_expansion.kernels._compile [CC ...] [--dtype bf16]`: JSON on stdout."""
    dtype = "bf16"
    if "--dtype" in argv:
        i = argv.index("--dtype")
        dtype = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    ccs = [int(a) for a in argv] or [80, 86, 90]
    t0 = time.time()
    res = {f"sm_{cc}": compile_all(cc, dtype) for cc in ccs}
    failed = [f"{t}/{n}" for t, r in res.items() for n, v in r.items() if v["error"]]
    json.dump({"dtype": dtype, "seconds": round(time.time() - t0, 2), "failed": failed,
               "results": res}, sys.stdout, indent=1)
    print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
