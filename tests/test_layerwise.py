"""benchmarks/layerwise at a tiny configuration: output structure, and that its stage-by-stage
composition is the computation the driver runs (checks values, never wall-clock time)."""
import csv
import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sparse_expansion.config import PruneConfig
from sparse_expansion.methods import ExpansionMethod, ExpansionOptions, SparseGPTMethod, SparseGPTOptions, collect
from sparse_expansion.methods.expansion.router import fit_pca
from sparse_expansion.sparsity import Sparsity

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a namespace package at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.layerwise import config, evaluate, inputs, reference, report, stages  # noqa: E402
from benchmarks.layerwise.run import run  # noqa: E402


def tiny_config(out, **kw):
    base = dict(shapes=("7b_up", "7b_down"), scale=64, nsamples=4, seqlen=64, batch_windows=2,
                heldout_tokens=256, expansion=ExpansionOptions(clusters=4, pca_factor=8, kmeans_restarts=2),
                sparsities=("0.5", "2:4"), token_counts=(1, 16, 256), bench_budget_s=0.0, progress=False,
                plots=False, out=str(out))
    return config.BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("layerwise")
    torch.manual_seed(0)
    return run(tiny_config(out)), out


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_every_stage_and_ratio(tiny_run):
    results, _ = tiny_run
    assert results["failures"] == []
    rows = results["pruning"]
    for shape in ("7b_up/64", "7b_down/64"):
        for sp in ("0.5", "2:4"):
            for method in ("sparsegpt", "sparse-expansion"):
                got = {r["impl"]: r for r in rows if (r["shape"], r["sparsity"], r["method"]) == (shape, sp, method)}
                assert set(got) == {"library", "reference", "speedup"}, (shape, sp, method)
                for impl in ("library", "reference"):
                    r = got[impl]
                    for s in config.STAGES:
                        assert _finite(r[f"{s}_s"]) and r[f"{s}_s"] >= 0, (impl, s)
                    assert _finite(r["total_s"]) and r["total_s"] > 0
                    assert r["total_s"] >= 0.5 * sum(r[f"{s}_s"] for s in config.STAGES)
                    assert _finite(r["heldout_error"])
                ratios = got["speedup"]
                expected = config.STAGES if method == "sparse-expansion" else ("hessian", "inverse", "obs")
                for s in expected:
                    assert _finite(ratios[f"{s}_s"]) and ratios[f"{s}_s"] > 0, (method, s)
                if method == "sparsegpt":  # no router: PCA and k-means do not run
                    assert ratios["router_s"] is None
                assert _finite(ratios["total_s"]) and _finite(ratios["heldout_error"])


def test_heldout_errors(tiny_run):
    results, _ = tiny_run
    for shape in ("7b_up/64", "7b_down/64"):
        for sp in ("0.5", "2:4"):
            err = {r["method"]: r["heldout_error"] for r in results["quality"]
                   if (r["shape"], r["sparsity"]) == (shape, sp)}
            assert {"magnitude", "wanda", "sparsegpt", "sparse-expansion"} <= set(err)
            assert all(_finite(e) and e > 0 for e in err.values()), err
            assert err["sparsegpt"] <= err["magnitude"], (shape, sp, err)


def test_inference_rows_and_targets(tiny_run):
    results, _ = tiny_run
    inf = results["inference"]
    assert {(r["shape"], r["sparsity"], r["tokens"]) for r in inf} == {
        (s, sp, t) for s in ("7b_up/64", "7b_down/64") for sp in ("0.5", "2:4") for t in (1, 16, 256)}
    for r in inf:
        for key in ("dense_ms", "routing_ms", "routed_ms", "routed_ratio"):
            assert _finite(r[key]) and r[key] > 0, key
        if r["sparsity"] == "2:4":  # compressed experts through routed_matmul_24
            assert _finite(r["routed24_ms"]) and _finite(r["routed24_ratio"])
        else:
            assert r["routed24_ms"] is None
    targets = results["targets"]
    assert targets and all(isinstance(t["pass"], bool) and _finite(t["value"]) for t in targets)
    assert sum("reference" in t["target"] for t in targets) == 4  # one per shape and sparsity


def test_files_written(tiny_run):
    results, out = tiny_run
    data = json.loads((out / "layerwise_cpu.json").read_text())
    assert set(data) >= {"config", "pruning", "quality", "inference", "targets", "failures"}
    assert len(data["pruning"]) == len(results["pruning"])
    with open(out / "layerwise_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["section"] for r in rows} == {"pruning", "quality", "inference", "targets"}
    assert any(r["metric"] == "obs_s" and r["impl"] == "speedup" for r in rows)
    text = report.format_report(results)
    assert "speedup" in text and "routed/dense" in text


def _layer(cfg, name="7b_up"):
    torch.manual_seed(0)
    return inputs.synthetic_layer(cfg, name, 0)


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_library_pipeline_is_the_driver_computation(tmp_path, sparsity):
    """prune_library's stages give exactly what ExpansionMethod.prune_group and SparseGPTMethod give."""
    cfg = tiny_config(tmp_path)
    o = cfg.expansion
    layer = _layer(cfg)
    W = layer.weight
    sp = Sparsity.parse(sparsity)
    d_out, d_in = W.shape

    def block():
        b = nn.Module()
        b.lin = nn.Linear(d_in, d_out, bias=False)
        b.lin.weight.data.copy_(W)
        return b

    # Sparse Expansion
    run_ = stages.prune_library(W, layer.calib, sp, cfg, "sparse-expansion")
    b = block()
    method = PruneConfig("sparse-expansion", sp, seed=cfg.seed, options=o).make_method()
    assert isinstance(method, ExpansionMethod)
    rep = method.prune_group(b, {"lin": b.lin}, collect(method, {"lin": b.lin}, layer.calib), "b0")[0]
    assert torch.equal(b.lin.router.centroids, run_.router.centroids)
    assert torch.equal(b.lin.dense_weight(), run_.W_hat)
    assert rep.extras["cluster_sizes"] == run_.cluster_sizes
    assert rep.damping == run_.damping
    assert stages.calibration_error(W, run_) == pytest.approx(rep.relative_error, rel=1e-5)
    assert rep.to_dict()["kmeans_backend"] == run_.kmeans_backend
    # SparseGPT (the same blocksize and damping)
    run1 = stages.prune_library(W, layer.calib, sp, cfg, "sparsegpt")
    b = block()
    pc = PruneConfig("sparsegpt", sp, options=SparseGPTOptions(blocksize=o.blocksize, percdamp=o.percdamp))
    method = pc.make_method()
    assert isinstance(method, SparseGPTMethod)
    stats = collect(method, {"lin": b.lin}, layer.calib)
    rep1 = method.prune_group(b, {"lin": b.lin}, stats, "b0")[0]
    assert torch.equal(b.lin.weight, run1.W_hat[0])
    assert torch.equal(stats.H, run1.H_full)
    assert run1.cluster_sizes == [rep1.tokens] and rep1.damping == run1.damping
    assert stages.calibration_error(W, run1) == pytest.approx(rep1.relative_error, rel=1e-5)


def test_reference_matches_library_with_one_cluster(tmp_path):
    """With one cluster the reference is SparseGPT's single-matrix code: same pruned weights up to
    float rounding of the Hessian (the masks may differ in a few near-ties)."""
    cfg = tiny_config(tmp_path)
    layer = _layer(cfg, "7b_down")
    sp = Sparsity(0.5)
    lib = stages.prune_library(layer.weight, layer.calib, sp, cfg, "sparsegpt")
    ref = reference.prune_reference(layer.weight, layer.calib, sp, cfg, "sparsegpt")
    same_mask = ((lib.W_hat == 0) == (ref.W_hat == 0)).float().mean()
    assert same_mask > 0.99
    e_lib = evaluate.heldout_error(layer.weight, layer.heldout, lambda x: x @ lib.W_hat[0].t())
    e_ref = evaluate.heldout_error(layer.weight, layer.heldout, lambda x: x @ ref.W_hat[0].t())
    assert e_ref == pytest.approx(e_lib, rel=0.02)


def test_reference_kmeans_and_pca_agree_with_the_library():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 6, generator=g) * 8
    x = centers.repeat_interleave(60, 0) + torch.randn(300, 6, generator=g)
    c = reference.reference_kmeans(x, 5, seed=0, restarts=2)
    truth = torch.arange(5).repeat_interleave(60)
    labels = torch.cdist(x, c).argmin(1)
    assert len({(int(t), int(label)) for t, label in zip(truth, labels)}) == 5
    m1, b1 = reference.reference_pca(x, 3, "svd")
    m2, b2 = fit_pca(x, 3)
    m3, b3 = reference.reference_pca(x, 3, "eigh")
    assert torch.allclose(m1, m2) and torch.allclose(b1, b2, atol=1e-4) and torch.allclose(b3, b2, atol=1e-4)


def test_command_line_presets():
    threads = torch.get_num_threads()  # config_from_args sets the CPU thread count
    try:
        quick = config.config_from_args(["--quick", "--device", "cpu", "--shapes", "7b_up", "--no-plots"])
        full = config.config_from_args(["--full", "--device", "cpu", "--sparsity", "0.5,2:4", "--no-reference",
                                        "--clusters", "8", "--small-clusters", "damping"])
        with pytest.raises(SystemExit):
            config.config_from_args(["--quick", "--device", "cpu", "--small-clusters", "nope"])
    finally:
        torch.set_num_threads(threads)
    assert (quick.scale, quick.nsamples * quick.seqlen, quick.shapes) == (16, 16384, ("7b_up",))
    assert quick.expansion == ExpansionOptions()  # the driver's defaults, not copies
    assert (full.scale, full.nsamples, full.seqlen, full.reference) == (1, 128, 2048, False)
    assert full.sparsities == ("0.5", "2:4") and full.reference_pca == "svd"
    assert full.expansion == ExpansionOptions(clusters=8, small_clusters="damping")
    assert inputs.scaled_shape("70b_down", 16) == (1792, 512)
    flat = full.as_dict()
    assert flat["clusters"] == 8 and flat["shrink_tokens"] == ExpansionOptions().shrink_tokens


def test_peak_memory_above_start():
    """memory.PeakMemory(reset_rss=True): the kernel's peak RSS since entry, as the benchmark reports it;
    the default (the driver's) keeps exactly its keys."""
    from sparse_expansion.memory import RSS, PeakMemory
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    with PeakMemory("cpu", reset_rss=True) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, freed before the exit
        del x
    assert mem.above_start(RSS) >= 48 * 2**20
    with PeakMemory("cpu") as mem:
        pass
    assert set(mem.peak) == {"peak_rss_bytes"} and mem.peak["peak_rss_bytes"] > 0


def test_reference_matches_library_with_four_clusters(tmp_path):
    """At 4 clusters the one-cluster-at-a-time reference (its own PCA, Lloyd loop, masked Hessians
    and single-matrix OBS) finds the same clusters as the library and prunes them as well."""
    cfg = tiny_config(tmp_path)
    layer = _layer(cfg, "7b_up")
    sp = Sparsity(0.5)
    plain = dataclasses.replace(cfg, expansion=dataclasses.replace(cfg.expansion, refine_iterations=0))
    lib = stages.prune_library(layer.weight, layer.calib, sp, plain, "sparse-expansion")
    ref = reference.prune_reference(layer.weight, layer.calib, sp, cfg, "sparse-expansion")
    assert lib.W_hat.shape[0] == ref.W_hat.shape[0] == 4
    assert sorted(lib.cluster_sizes) == sorted(ref.cluster_sizes)
    e_lib = evaluate.run_heldout_error(layer.weight, layer.heldout, lib)
    e_ref = evaluate.run_heldout_error(layer.weight, layer.heldout, ref)
    assert e_ref == pytest.approx(e_lib, rel=0.02)
    # the library's default re-solves each expert on its mask: lower held-out error than the reference's
    refined = stages.prune_library(layer.weight, layer.calib, sp, cfg, "sparse-expansion")
    assert evaluate.run_heldout_error(layer.weight, layer.heldout, refined) < e_ref
