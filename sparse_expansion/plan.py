"""What a pruning run will need, predicted from the model's config alone (meta device, no weights).

`plan_run` walks the stages of one decoder block as the driver runs them (all blocks of the
supported families have one shape) and predicts, per stage, the bytes live on the device: the
block's weights, the calibration activations (unless offloaded), the forward pass's transient
tensors, and the method's state: one fp32 Hessian per group for the Hessian methods; for Sparse
Expansion the router samples and layer Hessians of the groups still to prune, the router fit,
one chunk of cluster Hessians with their solve (`expansion.cluster_cost`) and the compressed
experts solved so far. The chunking is the one the run will choose: --max-memory, else 90% of
the device memory left at the solve (a GPU), else one chunk (a CPU). The host holds the model (and
one block's experts: prune writes each finished block's experts to the output and releases them),
a runtime allowance, and on a CPU the device's stages too. Sizes of the checkpoint and of the output
follow from the same shapes.

The model is an estimate: allocator caching and fragmentation are not modelled (see
docs/large-models.md for the measured comparison). `prune` uses it to refuse up front a run whose block cannot fit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from . import distributed
from .config import PruneConfig
from .errors import UsageError
from .evaluate import windows_per_pass
from .shapes import PUBLISHED
from .methods.expansion.stages import cluster_cost, layer_hessians, refine_cost
from .storage.loading import DTYPES, meta_model, model_dtype
from .methods.expansion.method import SOLVE_SHARE
from .models import decoder_blocks, linear_weight, target_groups
from .methods.expansion.router import ROWS_PER_CHUNK
from .solvers import REFINE_BYTES_PER_WEIGHT, REFINE_ROWS

GiB = 2 ** 30
RUNTIME_HOST_BYTES = int(0.6 * GiB)  # python, torch, transformers and the tokenizer, measured on CPU
WORKSPACE_BYTES = 32 * 2 ** 20      # allocator slack and library buffers of any stage, measured on CPU



def planning_model(ref: str) -> nn.Module:
    """The meta model of a published shape's name or of any model reference (its config only)."""
    if ref in PUBLISHED:
        config = LlamaConfig(**{k: v for k, v in PUBLISHED[ref].items() if k != "dtype"})
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    return meta_model(ref)


def planning_dtype(ref: str, name: str = "auto") -> torch.dtype:
    if ref in PUBLISHED and name == "auto":
        return DTYPES[PUBLISHED[ref]["dtype"]]
    return model_dtype(ref, name)


@dataclass
class Stage:
    name: str
    device_bytes: int
    host_bytes: int


@dataclass
class GroupPlan:
    group: str
    columns: int
    rows: int                     # largest output dimension among the group's linears
    clusters_per_chunk: int = 0   # Sparse Expansion; 0 = not chunked (one matrix per linear)
    chunks: int = 1


@dataclass
class Plan:
    method: str
    device: str
    device_memory: int | None
    stages: list[Stage] = field(default_factory=list)
    groups: list[GroupPlan] = field(default_factory=list)
    checkpoint_bytes: int = 0
    output_bytes: int = 0
    dense_bytes: int = 0
    eval_bytes: int = 0           # `eval` of the output: memory of its device (the host on a CPU), experts lazy
    eval_in_memory_bytes: int = 0  # ... with a Sparse Expansion output's experts all in memory
    eval_onload_bytes: int = 0    # on a GPU: eval with one decoder block there at a time (--onload)
    fix: str | None = None        # the flag to change when the run cannot fit
    invalid: bool = False         # the arguments cannot run on any device (--max-memory, ranks)

    @property
    def peak_device(self) -> int:
        return max(s.device_bytes for s in self.stages)

    @property
    def peak_host(self) -> int:
        return max(s.host_bytes for s in self.stages)

    @property
    def verdict(self) -> str:
        if self.fix:
            return "not possible"
        return "chunking" if any(g.chunks > 1 for g in self.groups) else "fits"

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_device": self.peak_device, "peak_host": self.peak_host,
                "verdict": self.verdict}

    def table(self) -> str:
        rows = [f"{'stage':<34} {'device':>10} {'host':>10}"]
        rows += [f"{s.name:<34} {gib(s.device_bytes):>10} {gib(s.host_bytes):>10}" for s in self.stages]
        rows.append(f"{'peak':<34} {gib(self.peak_device):>10} {gib(self.peak_host):>10}")
        for g in self.groups:
            if g.clusters_per_chunk:
                rows.append(f"{g.group}: {g.chunks} chunk(s) of up to {g.clusters_per_chunk} clusters")
        rows.append(f"checkpoint {gib(self.checkpoint_bytes)}, output {gib(self.output_bytes)} "
                    f"(dense model {gib(self.dense_bytes)})")
        where = "GPU" if torch.device(self.device).type == "cuda" else "host"
        rows.append(f"eval of the output: {gib(self.eval_bytes)} of {where} memory" + (
            f" (experts read while they run; {gib(self.eval_in_memory_bytes)} with --experts saved)"
            if self.eval_in_memory_bytes != self.eval_bytes else "") + (
            f"; {gib(self.eval_onload_bytes)} one decoder block at a time (--onload)"
            if self.eval_onload_bytes else ""))
        memory = "" if self.device_memory is None else f" with {gib(self.device_memory)} of device memory"
        rows.append(f"verdict: {self.verdict}{memory}" + (f" — {self.fix}" if self.fix else ""))
        return "\n".join(rows)


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def expert_bytes(rows: int, columns: int, clusters: int, density: float, element: int) -> int:
    """One linear's experts in the bitmask form: kept values and one bit per weight."""
    return clusters * (int(rows * columns * density) * element + math.ceil(rows * columns / 8))


def plan_run(model: nn.Module, config: PruneConfig, nsamples: int, seqlen: int, dtype: torch.dtype,
             device: str = "cpu", device_memory: int | None = None, ranks: int = 1,
             offload_activations: bool = False, spill: bool = True, advise: bool = True) -> Plan:
    """The predicted stages of one block of `model` (a meta model is enough) pruned with `config`
    on `nsamples` x `seqlen` calibration tokens in `dtype`, on `device` with `device_memory`
    bytes (None: unbounded), the work split over `ranks` processes; `spill`: finished blocks'
    experts leave the host for the output (prune's way; prune_model without `spill` keeps them);
    `advise`: a plan that does not fit names the changes whose plans fit."""
    arguments = dict(model=model, config=config, nsamples=nsamples, seqlen=seqlen, dtype=dtype, device=device,
                     device_memory=device_memory, ranks=ranks, offload_activations=offload_activations, spill=spill)
    e = torch.tensor([], dtype=dtype).element_size()
    cfg, o = model.config, config.options
    gpu = torch.device(device).type == "cuda"
    block = decoder_blocks(model)[0]
    n_blocks = len(decoder_blocks(model))
    hidden = cfg.hidden_size
    tokens, batch_tokens = nsamples * seqlen, min(config.batch_size, nsamples) * seqlen
    groups = [[(name, tuple(linear_weight(block.get_submodule(name)).shape)) for name in g]
              for g in target_groups(model, config.targets)]
    targets = [shape for g in groups for _, shape in g]
    block_w = _numel(block) * e
    target_w = sum(r * c for r, c in targets) * e
    dense = _numel(model) * e

    expansion = config.method == "sparse-expansion"
    clusters = o.clusters if expansion else 1
    density = 1.0 - config.sparsity.rate
    experts_block = sum(expert_bytes(r, c, clusters, density, e) for r, c in targets) if expansion else target_w
    sample = min(tokens, o.max_cluster_tokens) if expansion else 0

    batches = math.ceil(nsamples / config.batch_size)
    # this rank's tokens: the other methods give each rank its share of the calibration batches
    mine = tokens if expansion else min(tokens, math.ceil(batches / ranks) * config.batch_size * seqlen)
    activations = (batch_tokens if offload_activations else mine) * hidden * e
    inter = max(max(r, c) for r, c in targets)
    forward = batch_tokens * e * (4 * inter + 6 * hidden) + 2 * batch_tokens * inter * 4
    if not gpu:  # the CPU's attention materializes the scores (batch x heads x L x L)
        forward += min(config.batch_size, nsamples) * cfg.num_attention_heads * seqlen * seqlen * e * 2

    plan = Plan(config.method, device, device_memory, dense_bytes=dense)
    start, end = config.blocks or (0, n_blocks)
    pruned_blocks = max(0, min(end, n_blocks) - start)  # --blocks: the others stay dense
    final_model = dense + pruned_blocks * (experts_block - target_w)
    # prune spills each finished block's experts to the output: the host holds one block's at a time
    # (on a GPU, once the block is back on the CPU; on a CPU they are counted in the stages)
    host_model = max(dense, final_model) if expansion and not spill else dense
    if expansion and spill and gpu:
        host_model += experts_block

    # from the first collecting pass to the propagate pass, the attention outputs are kept where the
    # activations are (driver.UnchangedOutputs): one more activation copy when no target is in them
    kept = 1 if config.targets == "ffn" else 0
    held = 2 + kept  # activation copies on the host when offloaded to it from a GPU

    def stage(name: str, on_device: int) -> None:
        on_device += WORKSPACE_BYTES
        host = RUNTIME_HOST_BYTES + host_model + (on_device - block_w if not gpu else
                                                  (mine * hidden * e * held if offload_activations else 0))
        plan.stages.append(Stage(name, on_device, host))

    stage("block + calibration activations", block_w + activations)
    if config.allocation == "owl":  # a second capture of the inputs runs through the dense blocks
        stage("OWL pre-pass: dense forward", block_w + 2 * activations + forward)
    base = block_w + activations * (1 + kept) if not (gpu and offload_activations) else block_w + activations
    if expansion:
        # pass 1 keeps each group's router sample and accumulates its layer Hessian (fp32)
        samples = [sample * g[0][1][1] * e + 4 * g[0][1][1] ** 2 for g in groups]
        stage("collect: dense pass, router samples", base + forward + sum(samples))
        solved = 0
        share = math.ceil(clusters / ranks)
        for i, g in enumerate(groups):
            (name, (_, columns)), rows = g[0], max(r for _, (r, _) in g)
            later = sum(samples[i + 1:])
            chunk = min(sample, ROWS_PER_CHUNK)  # fp32 rows projected at a time; covariance and eigh (fp32); k-means
            pca = (2 * chunk * columns * 4 + columns * columns * 4 * 4
                   + sample * 4 * (columns // max(o.pca_factor, 1) + 3 * o.kmeans_restarts * clusters))
            stage(f"router fit {name}", base + later + samples[i] + pca)
            fixed = base + later + samples[i] + (layer_hessians(o.small_clusters) - 1) * columns * columns * 4 + solved
            group_experts = sum(expert_bytes(r, c, clusters, density, e) for _, (r, c) in g)
            cost = cluster_cost(columns, rows)
            if o.refine_steps(config.bits):
                fixed += refine_cost(columns, rows)  # one expert re-solved at a time
            budget = config.max_memory
            if budget is None and device_memory is not None:  # what solve_budget will find free
                used = (fixed + group_experts if gpu
                        else RUNTIME_HOST_BYTES + host_model + fixed - block_w + group_experts)
                budget = int(SOLVE_SHARE * (device_memory - used))
            per_chunk = share if budget is None else max(0, min(share, budget // cost))
            plan.groups.append(GroupPlan("/".join(n for n, _ in g), columns, rows, per_chunk,
                                         math.ceil(share / max(per_chunk, 1))))
            stage(f"hessians + solve {name}", fixed + _chunks_peak(share, per_chunk, cost, group_experts, clusters))
            solved += group_experts  # kept compressed until the swap
            if per_chunk == 0 and config.max_memory is not None and not plan.fix:
                plan.invalid = True
                plan.fix = (f"--max-memory {gib(config.max_memory)} is below one cluster's Hessians and solve "
                            f"for {name} ({gib(cost)}); raise --max-memory")
        largest = max(expert_bytes(r, c, clusters, density, e) for r, c in targets)
        stage("swap the experts in", base + solved + largest)  # one linear's experts concatenated
    else:
        hessians = sum(g[0][1][1] ** 2 * 4 for g in groups)
        stage("collect: dense pass, Hessians", base + forward + hessians)
        for g in groups:
            (name, (_, columns)), rows = g[0], max(r for _, (r, _) in g)
            plan.groups.append(GroupPlan("/".join(n for n, _ in g), columns, rows))
            # SparseGPT: the factorisation's workspace beside H (in place: two C x C at a time), then
            # the factor and the weight's copies; Wanda and magnitude: the weight's scores, sort and mask
            work = (max(2 * columns * columns, columns * columns + 4 * rows * columns)
                    if config.method == "sparsegpt" else 6 * rows * columns)
            if config.method == "sparsegpt" and o.refine_steps(config.bits):  # the re-solve's transients
                work = max(work, columns * columns + 4 * rows * columns
                           + REFINE_BYTES_PER_WEIGHT * min(rows, REFINE_ROWS) * columns // 4)
            stage(f"solve {name}", base + hessians + 4 * work)
    pruned_block = block_w - target_w + experts_block
    stage("propagate: next block's inputs", pruned_block + 2 * activations + forward)

    try:
        distributed.check_split(config.method, clusters if expansion else None, ranks, batches)
    except UsageError as refusal:
        plan.invalid, plan.fix = True, str(refusal)
    if device_memory is not None and not plan.fix and (plan.peak_device if gpu else plan.peak_host) > device_memory:
        where = "device" if gpu else "memory"
        plan.fix = (f"one block needs {gib(plan.peak_device if gpu else plan.peak_host)} of {where}, "
                    f"{gib(device_memory)} available")
        if advise:
            plan.fix += "; " + _what_fits(lambda **change: plan_run(**{**arguments, **change, "advise": False}),
                                          config, nsamples, seqlen, ranks, offload_activations, gpu)
    # the checkpoint keeps every method's pruned linears compressed (values + bitmask)
    saved_block = sum(expert_bytes(r, c, clusters, density, e) for r, c in targets)
    plan.checkpoint_bytes = pruned_blocks * saved_block + tokens * hidden * e
    plan.output_bytes = final_model if expansion else dense
    # eval: loading holds the dense model (the pruned linears too, until replaced); scoring, the
    # model without them, one linear's experts when lazy (read and built), a batch's forward, its
    # logits and one window's fp32 log-softmax
    windows = windows_per_pass(cfg.vocab_size, seqlen, e)
    batch = windows * seqlen
    scoring = batch * e * (4 * inter + 6 * hidden) + (batch * e + seqlen * 4) * cfg.vocab_size
    if not gpu:
        scoring += windows * cfg.num_attention_heads * seqlen * seqlen * e * 2
    runtime = 0 if gpu else RUNTIME_HOST_BYTES
    if expansion:
        largest = max(expert_bytes(r, c, clusters, density, e) for r, c in targets)
        plan.eval_bytes = runtime + max(dense, dense - pruned_blocks * target_w + 2 * largest + scoring)
    else:
        plan.eval_bytes = runtime + dense + scoring
    plan.eval_in_memory_bytes = runtime + max(dense, plan.output_bytes + scoring)
    if gpu:  # what lies outside the blocks, one block (its experts read lazily) and the scoring
        plan.eval_onload_bytes = dense - (n_blocks - 1) * block_w + (2 * largest if expansion else 0) + scoring
    return plan


def _chunks_peak(share: int, per_chunk: int, cost: int, group_experts: int, clusters: int) -> int:
    """The largest working set over a group's chunks: the chunk's Hessians and solve, and the
    group's experts compressed up to the chunk's end."""
    size = max(per_chunk, 1)
    return max(min(size, share - start) * cost + group_experts * min(start + size, share) // clusters
               for start in range(0, share, size))


def _what_fits(replan: Callable[..., Plan], config: PruneConfig, nsamples: int, seqlen: int, ranks: int,
               offloaded: bool, gpu: bool) -> str:
    """The changes whose plans fit, as flags: --offload-activations on a GPU, with it the largest
    --nsamples, --max-cluster-tokens or --clusters (halving), or the fewest ranks (doubling, to 8)."""
    base = {} if offloaded or not gpu else {"offload_activations": True}
    flags = "--offload-activations " if base else ""
    fits = lambda **change: not replan(**base, **change).fix  # noqa: E731
    if base and fits():
        return "add --offload-activations"
    found = []
    halved = [n for n in (nsamples >> k for k in range(1, nsamples.bit_length())) if n >= 1]
    if config.method == "sparse-expansion":
        halved = [n for n in halved if n * seqlen >= config.options.clusters]
    found += [f"{flags}--nsamples {n}" for n in halved if fits(nsamples=n)][:1]
    if config.method == "sparse-expansion":
        o = config.options
        for name, lowest in (("max_cluster_tokens", o.clusters), ("clusters", 1)):
            value = getattr(o, name)
            values = [v for v in (value >> k for k in range(1, value.bit_length())) if v >= lowest]
            options = lambda v: replace(config, options=replace(o, **{name: v}))  # noqa: E731
            found += [f"{flags}--{name.replace('_', '-')} {v}" for v in values if fits(config=options(v))][:1]
    if gpu:
        found += [f"{flags}{r} ranks" for r in (2, 4, 8) if r > ranks and fits(ranks=r)][:1]
    if not found:
        tried = ["--offload-activations"] * bool(base) + ["a lower --nsamples"] \
            + ["--max-cluster-tokens", "--clusters"] * (config.method == "sparse-expansion") + ["up to 8 ranks"] * gpu
        return f"nothing tried fits ({', '.join(tried)}); use a device with more memory"
    return "fits with " + "; or ".join(found)
