"""A static performance model of the kernels: PREDICTIONS, not measurements.

    python benchmarks/roofline.py                 # from benchmarks/results/compile_bf16.json
    python benchmarks/roofline.py --compile       # recompile first (no GPU needed, ~30 s)

For each kernel target of benchmarks/kernel_speed.py, at Llama-2-7B and -70B shapes, on an H200 and an RTX 3090:
the compiled code (sparse_expansion/kernels/_compile.py: registers, shared memory, warps, and the SASS of the
main loop: instructions per iteration per warp) and the shapes give three lower bounds on a
call's time, and the prediction is the largest:
  issue   every warp-instruction the loops execute, 4 issued per SM per cycle, in waves of the
          CTAs that fit an SM (registers, shared memory, warps);
  tensor  the FLOPs the tensor cores execute at the published dense bf16 peak (x the wave
          quantisation);
  memory  the bytes that must cross HBM at the published bandwidth.
A bound model: latency stalls, cache misses and launch gaps make real kernels slower, so a
target this model misses is missed unless the baseline falls short of its own bound as much.
Baselines are bounds by the same rules (a dense GEMM: its FLOPs at the tensor peak or its bytes
at the bandwidth, whichever is longer; a GEMV: its bytes), so ratios compare bound with bound;
the torch references of OBS are launch-bound, `--launch-us` per eager op.
Writes benchmarks/results/roofline.json and prints the table the README shows.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from sparse_expansion.kernels.obs import far_width
from sparse_expansion.kernels.routed_matmul import gpu_configs

RESULTS = Path(__file__).resolve().parent / "results"
GPUS = {  # published: SMs, boost clock, dense bf16 tensor-core and fp32 peaks, HBM/GDDR bandwidth
    "H200": dict(cc="sm_90", sms=132, ghz=1.98, tc=989e12, fp32=67e12, bw=4.8e12, l2=50e6,
                 smem=232448, warps=64),
    "RTX 3090": dict(cc="sm_86", sms=82, ghz=1.695, tc=71e12, fp32=35.6e12, bw=936e9, l2=6e6,
                     smem=101376, warps=48),
}
SHAPES = {"Llama-2-7B": dict(d=4096, ffn=11008), "Llama-2-70B": dict(d=8192, ffn=28672)}
EXPERTS, TOKENS = 16, 16384


def ctas_per_sm(k: dict, gpu: dict) -> int:
    by_regs = 65536 // (max(k["registers"], 1) * 32 * k["num_warps"])
    by_smem = gpu["smem"] // max(k["shared"], 1)
    return max(0, min(by_regs, by_smem, gpu["warps"] // k["num_warps"], 32))


def kernel_time(k: dict, gpu: dict, programs: int, iterations: float, flops: float = 0.0,
                hbm_bytes: float = 0.0) -> dict:
    """The three bounds of one launch of `programs` CTAs looping `iterations` times."""
    per_sm = ctas_per_sm(k, gpu)
    waves = math.ceil(programs / (per_sm * gpu["sms"]))
    busiest = math.ceil(programs / gpu["sms"])  # CTAs the busiest SM runs (the scheduler spreads them)
    instructions = busiest * k["num_warps"] * (iterations * k["loop_instructions"]
                                               + k["instructions"] - k["loop_instructions"])
    issue = instructions / 4 / (gpu["ghz"] * 1e9)
    tensor = flops / gpu["tc"] * busiest * gpu["sms"] / programs if flops else 0.0
    memory = hbm_bytes / gpu["bw"]
    bound = max(("issue", issue), ("tensor", tensor), ("memory", memory), key=lambda b: b[1])
    return {"seconds": bound[1], "bound": bound[0], "issue": issue, "tensor": tensor, "memory": memory,
            "ctas_per_sm": per_sm, "waves": waves}


def hessian(k, gpu, d: int) -> dict:
    """All 16 cluster Hessians of one 16K-token call, d inputs (bf16 x, fp32 H)."""
    tiles = math.ceil(d / 128)
    pairs, n = tiles * (tiles + 1) // 2, TOKENS // EXPERTS
    flops = pairs * EXPERTS * 2 * 128 * 128 * n
    x_reads = 1 if n * d * 2 <= gpu["l2"] / 2 else tiles + 1  # a cluster's x stays in L2 while its pairs run
    hbm = TOKENS * d * 2 * x_reads + pairs * EXPERTS * 128 * 128 * 4 * 2  # x; the upper H tiles, read + write
    t = kernel_time(k, gpu, pairs * EXPERTS, n / 64, flops, hbm)
    t["fraction_of_peak"] = flops / gpu["tc"] / t["seconds"]
    return t


def obs(k, kt, gpu, rows: int, columns: int, launch_us: float) -> dict:
    """SparseGPT on 16 experts [rows, columns] (unstructured): the Triton column loop per 128-column
    block (`k`), the lazy trailing update in two levels (`kt`, the Triton GEMM: tf32x3 on tensor
    cores, three TF32 products at half the bf16 rate, or ieee on the FMA units, as compiled) and the block's
    mask choice in torch; against the torch reference looped per expert and batched, launch-bound
    (2 ops a column, ~6 per 32-column sub-block, ~10 per block) plus its trailing update, an fp32
    baddbmm on the FMA units (at 80% of their peak, or W's trailing columns read and written at
    the bandwidth, whichever is longer)."""
    blocks = math.ceil(columns / 128)
    # per column: the column loop (innermost), plus a 32nd of the sub-block loop around it (its
    # load, store and the tensor-core dot that carries the sub-block's errors to the block)
    per_column = k["inner_loop_instructions"] + (k["loop_instructions"] - k["inner_loop_instructions"]) / 32
    k = dict(k, loop_instructions=per_column, instructions=k["instructions"] - k["loop_instructions"] + per_column)
    loop = kernel_time(k, gpu, EXPERTS * math.ceil(rows / 16), 128, hbm_bytes=EXPERTS * rows * 128 * 4 * 2)
    widths = [columns - 128 * (b + 1) for b in range(blocks - 1)]  # the columns after each block
    trailing_flops = EXPERTS * rows * 2 * 128 * sum(widths)
    trailing_bytes = EXPERTS * rows * 4 * 2 * sum(widths)
    gemm = max(trailing_flops / (gpu["fp32"] * 0.8), trailing_bytes / gpu["bw"])

    def update(depth: int, widths: list[int]) -> float:  # one launch per width, `depth` errors deep
        flops = EXPERTS * rows * 2 * depth * sum(widths)
        tensor_flops = 0.0 if kt["precision"] == "ieee" else 6 * flops  # tf32x3 at the bf16 rate
        programs = EXPERTS * math.ceil(rows / 64) * sum(math.ceil(w / 128) for w in widths)
        return kernel_time(kt, gpu, programs, depth / 32, tensor_flops, EXPERTS * rows * 4 * 2 * sum(widths))["seconds"]

    # two levels (obs_prune_triton): each block to the end of its super-block, each super-block past it
    far = far_width(128, columns)
    ends = [min((128 * b // far + 1) * far, columns) for b in range(blocks)]
    near = [end - 128 * (b + 1) for b, end in enumerate(ends) if end > 128 * (b + 1)]
    trailing = update(128, near) + update(far, [columns - end for end in sorted(set(ends)) if end < columns])
    kernel = blocks * (loop["seconds"] + 10 * launch_us * 1e-6) + trailing
    launches = 2 * columns + 6 * columns / 32 + 10 * blocks
    looped = EXPERTS * launches * launch_us * 1e-6 + gemm
    batched = launches * launch_us * 1e-6 + gemm
    bound = f"{loop['bound']} (column loop)" if blocks * loop["seconds"] > trailing else "trailing update"
    return {"seconds": kernel, "bound": bound, "column_loop": blocks * loop["seconds"], "trailing_update": trailing,
            "trailing_gemm_torch": gemm, "reference_looped": looped, "reference_batched": batched,
            "vs_looped": looped / kernel, "vs_batched": batched / kernel, "ctas_per_sm": loop["ctas_per_sm"]}


def routed_prefill(k, gpu, tokens: int, n: int, kdim: int) -> dict:
    """16 experts [n, kdim], tokens spread evenly, against one dense linear of the same tokens."""
    block_m = 128 if tokens / EXPERTS >= 128 else 64
    m_blocks = EXPERTS * math.ceil(tokens / EXPERTS / block_m)
    flops = 2 * m_blocks * block_m * n * kdim
    # the grid runs an N-tile's programs of every M-block together: the experts' tiles stay in L2
    reuse = EXPERTS * 128 * kdim * 2 <= gpu["l2"] / 2
    weights = EXPERTS * n * kdim * 2 * (1 if reuse else math.ceil(tokens / EXPERTS / block_m))
    t = kernel_time(k, gpu, m_blocks * math.ceil(n / 128), kdim / 64, flops, weights + 2 * tokens * (kdim + n) * 2)
    dense_flops = 2 * tokens * n * kdim
    dense = max(dense_flops / gpu["tc"], (n * kdim + tokens * (kdim + n)) * 2 / gpu["bw"])
    t.update(dense=dense, vs_dense=t["seconds"] / dense, efficiency_vs_dense_gemm=(dense_flops / t["seconds"])
             / (dense_flops / dense))
    return t


DECODE_FORMATS = {  # weight bytes per weight at 50% (bf16), the target's speed-up over a dense GEMV
    "dense": (2.0, 1 / 1.1, "within 1.1x of dense GEMV"),
    "2:4": (2 * 0.5 + 1 / 8, 1.6, ">= 1.6x dense GEMV"),  # values + 4 bits of positions per 4 weights
    "bitmask": (2 * 0.5 + 1 / 8 + 4 / 64, 1.3, ">= 1.3x dense GEMV"),  # values + 1 bit + int32 per 64
}


def routed_decode(ks, gpu, n: int, kdim: int, fmt: str) -> dict:
    """One token, its expert [n, kdim] in format `fmt` (DECODE_FORMATS), against a dense bf16
    GEMV of the same weight; the kernel and tiles routed_matmul.default_config picks for one
    token (2:4: the FMA path, "gemv", no tensor-core work; else the 16-row dot tiles)."""
    configs = gpu_configs(fmt, 2, int(gpu["cc"][3:]))
    name = "gemv" if "gemv" in configs else "decode"
    config = configs[name]
    k = ks[f"routed_{'24' if fmt == '2:4' else fmt}[{name}]"]
    weight = n * kdim * DECODE_FORMATS[fmt][0]
    flops = 0.0 if name == "gemv" else 2 * config.BLOCK_M * n * kdim
    t = kernel_time(k, gpu, math.ceil(n / config.BLOCK_N), kdim / config.BLOCK_K, flops, weight)
    gemv = n * kdim * 2 / gpu["bw"]
    t.update(gemv=gemv, speed_vs_gemv=gemv / t["seconds"])
    return t


def model(compiled: dict, args) -> list[dict]:
    rows = []
    for gname, gpu in GPUS.items():
        ks = compiled[gpu["cc"]]
        for sname, s in SHAPES.items():
            d, ffn = s["d"], s["ffn"]
            for inputs in (d, ffn):
                h = hessian(ks["hessian"], gpu, inputs)
                rows.append(dict(gpu=gname, shape=sname, kernel=f"Hessian, 16 clusters, d={inputs}", **h,
                                 target=">= 60% of bf16 peak", value=f"{h['fraction_of_peak']:.0%}",
                                 met=h["fraction_of_peak"] >= 0.6))
            o = obs(ks["obs[0:1,quant=False]"], ks["obs_trailing"], gpu, ffn, d, args.launch_us)
            rows.append(dict(gpu=gname, shape=sname, kernel=f"OBS, 16 experts {ffn}x{d}", **o,
                             target=">= 10x looped, >= 3x batched",
                             value=f"{o['vs_looped']:.1f}x, {o['vs_batched']:.1f}x",
                             met=o["vs_looped"] >= 10 and o["vs_batched"] >= 3))
            for tokens in (2048, 8192):
                name = "routed_dense[prefill]" if tokens / EXPERTS >= 128 else "routed_dense[prefill,m64]"
                r = routed_prefill(ks[name], gpu, tokens, ffn, d)
                target, value, met = ((">= 70% of dense GEMM efficiency", f"{r['efficiency_vs_dense_gemm']:.0%}",
                                       r["efficiency_vs_dense_gemm"] >= 0.7) if tokens == 2048 else
                                      ("<= 1.2x dense linear", f"{r['vs_dense']:.2f}x", r["vs_dense"] <= 1.2))
                rows.append(dict(gpu=gname, shape=sname, kernel=f"routed prefill, T={tokens}, {ffn}x{d}", **r,
                                 target=target, value=value, met=met))
            for fmt, (_, goal, target) in DECODE_FORMATS.items():
                r = routed_decode(ks, gpu, ffn, d, fmt)
                rows.append(dict(gpu=gname, shape=sname, kernel=f"routed decode T=1, {fmt} {ffn}x{d}", **r,
                                 target=target, value=f"{r['speed_vs_gemv']:.2f}x", met=r["speed_vs_gemv"] >= goal))
    return rows


def table(rows: list[dict]) -> str:
    out = ["| GPU | shape | kernel | predicted | bound | target | predicted value | verdict |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['gpu']} | {r['shape']} | {r['kernel']} | {r['seconds'] * 1e3:.3g} ms | {r['bound']} | "
                   f"{r['target']} | {r['value']} | {'met' if r['met'] else 'missed'} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true",
                   help="recompile the kernels first (sparse_expansion/kernels/_compile.py)")
    p.add_argument("--launch-us", type=float, default=6.0, help="time of one eager torch op (launch-bound)")
    args = p.parse_args()
    source = RESULTS / "compile_bf16.json"
    if args.compile:
        out = subprocess.run([sys.executable, "-m", "sparse_expansion.kernels._compile", "80", "86", "90"],
                             capture_output=True, text=True, check=True).stdout
        source.write_text(out)
    compiled = json.loads(source.read_text())["results"]
    rows = model(compiled, args)
    (RESULTS / "roofline.json").write_text(json.dumps({"assumptions": vars(args), "gpus": GPUS, "rows": rows},
                                                      indent=1, default=str))
    print("PREDICTIONS from the compiled code (no GPU ran this); see the docstring for the model.")
    print(table(rows))


if __name__ == "__main__":
    main()
