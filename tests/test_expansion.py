import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sparse_expansion.storage import loading
from sparse_expansion.storage.lazy import LazyExperts
from sparse_expansion import models, solvers
from sparse_expansion.config import PruneConfig
from sparse_expansion.driver import prune_model
from sparse_expansion.errors import UsageError
from sparse_expansion.methods.expansion.experts import (SparseExpertLinear, compress, concat_compressed,
                                                        convert_experts, decompress)
from sparse_expansion.methods.expansion import stages
from sparse_expansion.methods.expansion.stages import cluster_cost, expert_damping, merge_small_clusters
from sparse_expansion.kernels.hessian import accumulate_hessian_reference, complete_hessian
from sparse_expansion.methods import ExpansionMethod, ExpansionOptions
from sparse_expansion.methods.expansion.router import (Router, _cluster_sums, fit_pca, fit_router, kmeans_torch,
                                                       pca_from_hessian)
from sparse_expansion.storage.outputs import PartialOutput, expert_layers, load_pruned, save_pruned_model, spill_block
from sparse_expansion.sparsity import Sparsity
from tiny import random_tokens, tiny_model


def se_config(sparsity=Sparsity(0.5), **kw):
    options = ExpansionOptions(**{"clusters": 4, "pca_factor": 8, "kmeans_restarts": 2, **kw})
    return PruneConfig("sparse-expansion", sparsity, options=options)


def ffn_weights(model):
    out = {}
    for b, block in enumerate(models.decoder_blocks(model)):
        for g in models.target_groups(model, "ffn"):
            for name in g:
                m = block.get_submodule(name)
                out[f"{b}.{name}"] = (m.expert_weight(0) if isinstance(m, SparseExpertLinear)
                                      else models.linear_weight(m))
    return out


@pytest.mark.parametrize("family,refine", [("llama", 0), ("gpt2", 0), ("llama", 5)])
def test_one_cluster_is_exactly_sparsegpt(family, refine):
    calib = random_tokens(4, 32)
    sgpt, se = tiny_model(family), tiny_model(family)
    prune_model(sgpt, calib, PruneConfig("sparsegpt", Sparsity(0.5), options={"refine_iterations": refine}),
                progress=False)
    prune_model(se, calib, se_config(clusters=1, refine_iterations=refine), progress=False)
    a, b = ffn_weights(sgpt), ffn_weights(se)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def blobs(n_per=200, k=5, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) * 10
    truth = torch.arange(k).repeat_interleave(n_per)
    return centers[truth] + torch.randn(k * n_per, dim, generator=g), truth


def test_kmeans_recovers_separated_clusters():
    x, truth = blobs()
    fit = fit_router(x, 5, pca_factor=0, seed=0, restarts=3)
    # every true blob maps to exactly one cluster and vice versa
    pairs = {(int(t), int(label)) for t, label in zip(truth, fit.labels)}
    assert len(pairs) == 5 and len({label for _, label in pairs}) == 5
    assert fit.backend == "torch"


def test_kmeans_is_seeded_and_restarts_never_hurt():
    x, _ = blobs(k=8, seed=3)
    c1, i1 = kmeans_torch(x, 6, seed=1, restarts=1)
    c1b, _ = kmeans_torch(x, 6, seed=1, restarts=1)
    assert torch.equal(c1, c1b)
    _, i5 = kmeans_torch(x, 6, seed=1, restarts=5)
    assert i5 <= i1


def test_pca_router_routes_calibration_tokens_to_their_labels_batch_by_batch():
    x, _ = blobs(k=6, dim=64)
    fit = fit_router(x, 6, pca_factor=8, seed=0, restarts=2)
    assert fit.router.basis.shape == (64, 8)
    routed = torch.cat([fit.router.assign(chunk) for chunk in x.split(77)])
    assert torch.equal(routed, fit.labels)


def test_pca_from_the_layer_hessian_is_the_pca_of_the_rows():
    """The router's PCA from the moments pass 1 accumulates (H = 2/N·XᵀX and the mean) gives
    fit_pca's directions on the same rows, with their signs (the 4 leading ones: 6 blobs span 5
    well separated directions, the rest is noise of equal variance)."""
    x, _ = blobs(k=6, dim=64)
    x = x + 3.0  # a mean far from 0: the covariance is H/2 − μμᵀ
    H = torch.zeros(1, 64, 64)
    accumulate_hessian_reference(H, torch.zeros(1, dtype=torch.long), x)
    mean, basis = pca_from_hessian(complete_hessian(H)[0], x.double().mean(0), 4)
    want_mean, want_basis = fit_pca(x, 4)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(basis, want_basis, atol=1e-4, rtol=0)


def test_kmeans_cluster_sums_match_the_one_hot_product():
    g = torch.Generator().manual_seed(0)
    z, labels = torch.randn(97, 5, generator=g), torch.randint(0, 7, (3, 97), generator=g)
    sums, counts = _cluster_sums(z, labels, 7)
    onehot = torch.nn.functional.one_hot(labels, 7).float()
    torch.testing.assert_close(sums, onehot.transpose(1, 2) @ z)
    assert torch.equal(counts, onehot.sum(1).long())


@pytest.mark.parametrize("steps", [0, 2])
def test_reports_time_the_re_solve_within_the_solve(steps):
    reports = prune_model(tiny_model("llama"), random_tokens(2, 16), se_config(refine_iterations=steps),
                          progress=False).layers
    for r in reports:
        assert (r.extras["seconds_refine"] > 0) == (steps > 0)
        assert r.extras["seconds_refine"] <= r.seconds_solve


def test_driver_routing_reproduces_cluster_sizes():
    model = tiny_model("llama")
    calib = random_tokens(4, 32)
    reports = prune_model(model, calib, se_config(), progress=False).layers
    gate = next(r for r in reports if r.layer == "block0.mlp.gate_proj")
    seen = []
    module = model.model.layers[0].mlp.gate_proj
    hook = module.register_forward_pre_hook(lambda m, a: seen.append(m.router.assign(a[0])))
    with torch.no_grad():
        for batch in calib.split(8):
            model(batch)
    hook.remove()
    assert torch.bincount(torch.cat(seen), minlength=4).tolist() == gate.extras["cluster_sizes"]
    assert model.model.layers[0].mlp.up_proj.router is module.router  # gate/up share one router
    assert model.model.layers[0].mlp.down_proj.router is not module.router


@pytest.mark.parametrize("fmt", ["bitmask", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (1, 24), (3, 5, 24), (0, 24)])
def test_sparse_expert_linear_matches_per_token_reference(dtype, shape, fmt):
    g = torch.Generator().manual_seed(0)
    router = Router(torch.randn(3, 4, generator=g), torch.randn(24, generator=g), torch.randn(24, 4, generator=g))
    weight = torch.randn(3, 7, 24, generator=g).to(dtype) * (torch.rand(3, 7, 24, generator=g) > 0.4)
    bias = torch.randn(3, 7, generator=g).to(dtype)
    layer = SparseExpertLinear(router, weight, bias)
    layer = layer.to_dense() if fmt == "dense" else layer
    assert layer.format == fmt
    x = torch.randn(*shape[:-1], 24, generator=g).to(dtype) if shape != (7,) else torch.randn(24, generator=g).to(dtype)
    y = layer(x)
    flat = x.reshape(-1, 24)
    expert = router.assign(flat)
    expected = torch.stack([flat[t].float() @ weight[e].float().t() + bias[e].float()
                            for t, e in enumerate(expert.tolist())]) \
        if flat.shape[0] else torch.zeros(0, 7)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], 7)
    torch.testing.assert_close(y.reshape(-1, 7).float(), expected, rtol=tol, atol=tol)


def test_bitmask_experts_run_in_the_routed_kernel(monkeypatch):
    """The default format's forward through the Triton kernel (under the interpreter here) gives
    the per-expert decompression's outputs; in_features 40 spans a partial 64-column tile."""
    g = torch.Generator().manual_seed(1)
    router = Router(torch.randn(3, 40, generator=g))
    layer = SparseExpertLinear(router, torch.randn(3, 9, 40, generator=g) * (torch.rand(3, 9, 40, generator=g) > 0.5),
                               torch.randn(3, 9, generator=g))
    x = torch.randn(2, 11, 40, generator=g)
    expected = layer(x)
    monkeypatch.setenv("SPARSE_EXPANSION_KERNELS", "triton")
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_compress_roundtrip():
    w = torch.randn(3, 5, 17) * (torch.rand(3, 5, 17) > 0.5)
    parts = compress(w)
    assert parts["values"].numel() == int((w != 0).sum())
    assert torch.equal(parts["mask"], torch.from_numpy(np.packbits((w != 0).flatten().numpy())))  # the file format
    assert torch.equal(decompress(parts), w)


def test_experts_stay_compressed_in_memory_and_decompress_one_at_a_time():
    """Odd sizes (5·17 bits per expert: experts straddle bytes of the bitmask); expert 1 keeps nothing."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 5, 17, generator=g) * (torch.rand(3, 5, 17, generator=g) > 0.5)
    w[1] = 0
    layer = SparseExpertLinear(Router(torch.randn(3, 17, generator=g)), w)
    assert layer.format == "bitmask" and not hasattr(layer, "weight")
    stored = layer.values.numel() * layer.values.element_size() + layer.mask.numel()
    assert stored < w.numel() * w.element_size() / 1.5
    for e in range(3):
        assert torch.equal(layer.expert_weight(e), w[e])
    assert torch.equal(layer.dense_weight(), w) and torch.equal(layer.to_dense().dense_weight(), w)


def test_merge_rule_leaves_no_small_cluster_and_reroutes():
    x, _ = blobs(n_per=100, k=4, dim=8)
    x = torch.cat([x, x[:3] + 50.0])  # a far-away cluster of 3 tokens
    fit = fit_router(x, 5, pca_factor=0, seed=0, restarts=2)
    assert torch.bincount(fit.labels).min() == 3
    router, labels, dropped = merge_small_clusters(fit.router, x, fit.labels, min_tokens=10)
    assert len(dropped) == 1 and router.clusters == 4
    assert torch.bincount(labels, minlength=4).min() >= 10
    assert torch.equal(router.assign(x), labels)


@pytest.mark.parametrize("rule", ["pooled", "damping", "shrink", "merge"])
def test_small_cluster_rules_are_reported(rule):
    model = tiny_model("llama")
    reports = prune_model(model, random_tokens(2, 32),
                          se_config(clusters=8, small_clusters=rule, min_cluster_tokens=10),
                          progress=False).layers
    for report in reports:
        r, columns = report.extras, report.shape[1]
        assert r["small_clusters"]["rule"] == rule
        assert r["small_clusters"]["expert_damping"] == pytest.approx(0.1 * (1 + 8 * columns / 64) if rule == "pooled"
                                                                      else 0.01)
        assert sum(r["cluster_sizes"]) == 64
        if rule == "merge":
            assert min(r["cluster_sizes"]) >= 10 and r["clusters"] == 8 - len(r["small_clusters"]["merged_clusters"])


def test_pooled_damping_grows_with_the_inputs_an_average_cluster_lacks():
    """0.1 with plenty of tokens per cluster, 0.1·(1 + k·d/N) in general: SmolLM2's down_proj at the
    reference protocol (d 1,536, 16 clusters sharing 16,384 tokens) 0.25; a given damping or one cluster
    (exactly SparseGPT) are left alone."""
    assert expert_damping("pooled", None, 0.01, 16, 1536, 16384) == pytest.approx(0.25)
    assert expert_damping("pooled", None, 0.01, 16, 576, 128 * 2048) == pytest.approx(0.1035, abs=1e-4)
    assert expert_damping("pooled", 0.3, 0.01, 16, 1536, 16384) == 0.3
    assert expert_damping("pooled", None, 0.01, 1, 1536, 16384) == 0.01
    assert expert_damping("shrink", None, 0.01, 16, 1536, 16384) == 0.01


def test_pooled_rule_matches_its_definition():
    """pooled: (n_c·H_c + τ·T_c)/(n_c + τ), T_c = 2·(pooled within-cluster scatter/N + μ_cμ_cᵀ),
    against a direct fp64 computation from the centred rows; the means kept exactly."""
    gen = torch.Generator().manual_seed(3)
    k, d = 3, 6
    labels = torch.tensor([0] * 40 + [1] * 7 + [2] * 13)
    x = torch.randn(60, d, generator=gen) + 3 * torch.randn(k, d, generator=gen)[labels]
    H_c = torch.zeros(k, d, d)
    counts = torch.zeros(k, dtype=torch.long)
    accumulate_hessian_reference(H_c, counts, x, labels)
    H_full = torch.zeros(1, d, d)
    accumulate_hessian_reference(H_full, torch.zeros(1, dtype=torch.long), x)
    complete_hessian(H_c), complete_hessian(H_full)
    sums = torch.zeros(k, d, dtype=torch.float64)
    stages.add_cluster_sums(sums, x, labels, rows=16)  # several row blocks
    means = stages.cluster_means(sums, counts)
    within = stages.within_cluster_hessian(H_full, means, counts)
    xd = x.double()
    mu = torch.stack([xd[labels == c].mean(0) for c in range(k)])
    scatter = sum((xd[labels == c] - mu[c]).T @ (xd[labels == c] - mu[c]) for c in range(k))
    torch.testing.assert_close(means, mu)
    torch.testing.assert_close(within.double(), 2 * scatter / 60, atol=1e-5, rtol=1e-5)
    tau = 5.0
    got = stages.solve_hessians(H_c, counts, H_full, "pooled", tau, means=means, within=within)
    for c in range(k):
        n = int(counts[c])
        own = 2 * xd[labels == c].T @ xd[labels == c] / n
        want = (n * own + tau * (2 * scatter / 60 + 2 * torch.outer(mu[c], mu[c]))) / (n + tau)
        torch.testing.assert_close(got[c].double(), want, atol=1e-4, rtol=1e-5)
    assert stages.shrink_tau(None, d, "pooled") == d / 4 and stages.shrink_tau(None, d, "shrink") == d
    with pytest.raises(ValueError):
        stages.solve_hessians(H_c, counts, H_full, "pooled", tau)


def test_bad_expansion_options():
    for kw in (dict(clusters=0), dict(pca_factor=-1), dict(small_clusters="drop"), dict(expert_damping=1.5)):
        with pytest.raises(UsageError):
            se_config(**kw)


@pytest.fixture(scope="module")
def saved_expert_model(tmp_path_factory, smollm2):
    _, tokenizer = smollm2
    model = tiny_model("llama", vocab_size=len(tokenizer))
    prune_model(model, random_tokens(4, 32, vocab=len(tokenizer)), se_config(), progress=False)
    folder = tmp_path_factory.mktemp("se") / "model"
    save_pruned_model(model, tokenizer, str(folder), {"layers": []})
    return model, folder


def test_save_load_gives_identical_logits(saved_expert_model):
    model, folder = saved_expert_model
    meta = json.loads((folder / "sparse_expansion.json").read_text())
    assert meta["saved_bytes"] < 4 * meta["dense_bytes"]  # 4 experts at 50% stored compressed
    loaded, tok = load_pruned(folder)
    ids = random_tokens(2, 16, vocab=len(tok))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, SparseExpertLinear)
    assert loaded.model.layers[1].mlp.gate_proj.router is loaded.model.layers[1].mlp.up_proj.router
    reloaded, _ = loading.load_model(str(folder))  # the CLI's loader recognises expert folders
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, SparseExpertLinear)


def test_lazy_experts_give_the_same_logits_one_linear_in_memory_at_a_time(saved_expert_model, monkeypatch):
    """A lazily loaded folder reads each linear's experts while it runs: logits equal the eager
    load's bit for bit, on the CPU and wherever the model is moved, and no two linears' experts
    are ever in memory together."""
    import weakref

    model, folder = saved_expert_model
    lazy = loading.load_model(str(folder), lazy=True)[0]
    assert sum(isinstance(m, LazyExperts) for m in lazy.modules()) == 6
    assert not any(isinstance(m, SparseExpertLinear) for m in lazy.modules())
    alive, most = weakref.WeakSet(), []
    materialize = LazyExperts.materialize

    def counted(self):
        module = materialize(self)
        alive.add(module)
        most.append(len(alive))
        return module
    monkeypatch.setattr(LazyExperts, "materialize", counted)
    ids = random_tokens(2, 16, vocab=model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(lazy(ids).logits, model(ids).logits)
        assert len(most) == 6 and max(most) == 1
        lazy.to(torch.float64)  # the materialized experts follow the model's moves
        assert lazy(ids).logits.dtype == torch.float64
    with pytest.raises(UsageError, match="loaded lazily .* lazy=False"):
        save_pruned_model(lazy, None, str(folder.parent / "again"), {})


def test_converted_experts_give_the_same_logits(saved_expert_model):
    model, folder = saved_expert_model
    loaded, tok = load_pruned(folder)
    ids = random_tokens(2, 16, vocab=len(tok))
    with torch.no_grad():
        saved = loaded(ids).logits
        assert convert_experts(loaded, "dense") == 6  # gate, up and down of two blocks
        assert {m.format for m in loaded.modules() if isinstance(m, SparseExpertLinear)} == {"dense"}
        torch.testing.assert_close(loaded(ids).logits, saved, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense"):
        convert_experts(loaded, "csr")


@pytest.mark.smoke
def test_transformers_auto_class_rebuilds_the_experts(saved_expert_model):
    """Importing sparse_expansion registers the folder's model type with the Auto classes."""
    model, folder = saved_expert_model
    assert json.loads((folder / "config.json").read_text())["model_type"] == "sparse_expansion"
    assert "import sparse_expansion" in (folder / "README.md").read_text()  # the card says how to load it
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", revision="main", trust_remote_code=False)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, SparseExpertLinear) and loaded.config.use_cache
    ids = random_tokens(2, 16, vocab=model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        assert loaded.generate(ids[:, :4], max_new_tokens=3, do_sample=False).shape == (2, 7)
    half = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16, device_map="cpu")
    assert half.model.layers[0].mlp.up_proj.weight_dtype == torch.bfloat16
    lazy = AutoModelForCausalLM.from_pretrained(folder, lazy=True)  # experts read while they run
    assert isinstance(lazy.model.layers[0].mlp.up_proj, LazyExperts)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, lazy(ids).logits)
    # what transformers' own from_pretrained passes besides: hub and caching keywords, ignored
    hub = AutoModelForCausalLM.from_pretrained(folder, force_download=False, cache_dir=None, local_files_only=True,
                                               proxies=None, token=None, low_cpu_mem_usage=True,
                                               attn_implementation="eager")
    assert hub.config._attn_implementation == "eager"
    with pytest.raises(UsageError, match="quantization_config"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config={"bits": 4})
    with pytest.raises(UsageError, match="variant"):
        AutoModelForCausalLM.from_pretrained(folder, variant="fp16")
    with pytest.warns(UserWarning, match="ignores .'some_future_option'"):
        AutoModelForCausalLM.from_pretrained(folder, some_future_option=3)


@pytest.mark.smoke
def test_pipeline_and_lm_eval_load_an_expert_folder(saved_expert_model):
    """The loaders users reach for, with the keywords they pass (transformers' pipeline, lm-eval's HFLM)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import pipeline
    model, folder = saved_expert_model
    ids = random_tokens(2, 16, vocab=model.config.vocab_size)
    with warnings.catch_warnings(record=True) as caught:  # every keyword they pass is known to the loader
        warnings.simplefilter("always")
        generator = pipeline("text-generation", model=str(folder), device="cpu")
        lm = HFLM(pretrained=str(folder), device="cpu", batch_size=1)
    assert not [w for w in caught if "Sparse Expansion model ignores" in str(w.message)]
    assert isinstance(generator.model.model.layers[0].mlp.up_proj, SparseExpertLinear)
    (out,) = generator("The river", max_new_tokens=3, do_sample=False)
    assert out["generated_text"].startswith("The river")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, lm.model(ids).logits)


def test_plain_transformers_refuses_an_expert_folder(saved_expert_model):
    """Without the package, the folder's model type is unknown: an error, not random experts."""
    _, folder = saved_expert_model
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            "AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True); "
            "assert 'sparse_expansion' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert run.returncode != 0 and "model type `sparse_expansion`" in run.stderr, run.stderr[-2000:]


def test_spilled_blocks_leave_memory_and_load_back_identical(saved_expert_model, smollm2, tmp_path):
    """prune's path: each finished block's experts written to the partial output and released
    (SpilledExperts); the saved folder loads to the same model as one saved from memory."""
    model, folder = saved_expert_model
    _, tokenizer = smollm2
    spilled = tiny_model("llama", vocab_size=len(tokenizer))
    partial = PartialOutput(str(tmp_path / "spilled"))
    blocks = models.family_of(spilled).blocks
    prune_model(spilled, random_tokens(4, 32, vocab=len(tokenizer)), se_config(), progress=False,
                spill=lambda b: spill_block(spilled, f"{blocks}.{b}", partial.folder, f"experts-{b:05d}.safetensors"))
    assert not expert_layers(spilled)
    assert sorted(f.name for f in partial.folder.iterdir()) == ["experts-00000.safetensors",
                                                                "experts-00001.safetensors"]
    ids = random_tokens(2, 16, vocab=len(tokenizer))
    with pytest.raises(RuntimeError, match="released from memory"), torch.no_grad():
        spilled(ids)
    out = save_pruned_model(spilled, tokenizer, str(tmp_path / "spilled"), {"layers": []}, partial=partial)
    assert not partial.folder.exists()
    a, b = (json.loads((f / "sparse_expansion.json").read_text()) for f in (folder, out))
    assert a["dense_bytes"] == b["dense_bytes"]
    loaded, _ = load_pruned(out)
    for (name, x), (_, y) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(x, y), name
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_experts_file_is_a_clear_error(saved_expert_model, tmp_path, damage):
    import shutil
    _, folder = saved_expert_model
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = copy / "experts.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="truncated or corrupted"):
        load_pruned(copy)


def test_truncated_dense_part_is_a_clear_error(saved_expert_model, tmp_path):
    import shutil
    _, folder = saved_expert_model
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UsageError, match="model.safetensors is missing, truncated or corrupted"):
        load_pruned(copy)
    meta = json.loads((copy / "sparse_expansion.json").read_text())
    del meta["sha256"]  # a folder written before the dense files' sha256 were recorded
    (copy / "sparse_expansion.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="dense part cannot be loaded"):
        load_pruned(copy)


def test_24_format_gives_the_same_outputs_and_survives_save_load(tmp_path, smollm2):
    _, tokenizer = smollm2
    model = tiny_model("llama", vocab_size=len(tokenizer))
    prune_model(model, random_tokens(4, 32, vocab=len(tokenizer)), se_config(sparsity=Sparsity.parse("2:4")),
                progress=False)
    ids = random_tokens(2, 16, vocab=len(tokenizer))
    with torch.no_grad():
        before = model(ids).logits
        for m in model.modules():
            if isinstance(m, SparseExpertLinear):
                m.to_24()
        after = model(ids).logits
    torch.testing.assert_close(before, after)
    save_pruned_model(model, tokenizer, str(tmp_path / "m"), {})
    loaded, _ = load_pruned(tmp_path / "m")
    assert loaded.model.layers[0].mlp.gate_proj.format == "2:4"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, after)


def test_to_24_refuses_unstructured_experts():
    router = Router(torch.randn(2, 4))
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        SparseExpertLinear(router, torch.randn(2, 3, 8)).to_24()


@pytest.mark.parametrize("sample", [None, 100], ids=["replayed", "sampled-router"])
def test_chunked_hessians_and_solves_give_the_unchunked_model(sample, monkeypatch):
    """--max-memory small enough for one cluster at a time: only that cluster's Hessian exists at
    once, and the experts are the same, bit for bit. With a sampled router every chunk takes its
    own pass over the block's inputs; with the whole sample stored, the rows are replayed."""
    calib = random_tokens(4, 32)
    extra = {} if sample is None else {"max_cluster_tokens": sample}
    whole, chunked = tiny_model("llama"), tiny_model("llama")
    a = prune_model(whole, calib, se_config(**extra), progress=False)
    config = se_config(**extra)
    config.max_memory = cluster_cost(128, 64)  # one down_proj cluster per chunk (R=64, C=128)
    live = []
    real = ExpansionMethod.solve_chunk
    monkeypatch.setattr(ExpansionMethod, "solve_chunk", lambda self, stats, chunk:
                        (live.append((len(stats.layers), stats.H.shape[0])), real(self, stats, chunk))[1])
    b = prune_model(chunked, calib, config, progress=False)
    assert set(live) == {(2, 2), (1, 1)}  # gate/up (C=64): 2 clusters' Hessians at once; down_proj: 1
    assert {r.extras["solve_chunks"] for r in a.layers} == {1}
    assert {r.extras["solve_chunks"] for r in b.layers} == {4, 2}
    for (name, x), (_, y) in zip(whole.state_dict().items(), chunked.state_dict().items()):
        assert torch.equal(x, y), name
    for ra, rb in zip(a.layers, b.layers):
        assert (ra.relative_error, ra.damping, ra.extras["cluster_relative_error"], ra.extras["cluster_sizes"]) == \
            (rb.relative_error, rb.damping, rb.extras["cluster_relative_error"], rb.extras["cluster_sizes"])


def test_compressed_parts_concatenate_at_any_bit_offset():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(5, 3, 7, generator=g) * (torch.rand(5, 3, 7, generator=g) > 0.5)  # 21 bits per expert
    parts = [compress(w[:2]), compress(w[2:3]), compress(w[3:])]
    assert torch.equal(decompress(concat_compressed(parts)), w)


def test_exact_compression_keeps_negative_zeros():
    w = torch.tensor([[0.0, -0.0, 1.5], [-2.0, 0.0, -0.0]])
    assert compress(w)["values"].numel() == 2
    back = decompress(compress(w, exact=True))
    assert torch.equal(back.view(torch.int32), w.view(torch.int32))


@pytest.mark.parametrize("method", ["sparsegpt", "sparse-expansion"])
def test_refined_weights_keep_the_mask_and_lower_the_calibration_error(method):
    """--refine-iterations re-solves the kept weights on SparseGPT's mask (each expert's, for
    Sparse Expansion): the same zeros, a lower error on the calibration tokens. (One block: the
    next block's inputs, and so its masks, depend on the re-solved weights.)"""
    calib = random_tokens(4, 32)
    results, weights = [], []
    for steps in (0, 5):
        model = tiny_model("llama")
        config = (se_config(refine_iterations=steps) if method == "sparse-expansion" else
                  PruneConfig("sparsegpt", Sparsity(0.5), options={"refine_iterations": steps}))
        config.blocks = (0, 1)
        results.append(prune_model(model, calib, config, progress=False))
        block = models.decoder_blocks(model)[0]
        layers = {n: block.get_submodule(n) for g in models.target_groups(model, "ffn") for n in g}
        weights.append({n: models.linear_weight(m) if method == "sparsegpt" else
                        torch.cat([m.expert_weight(c) for c in range(4)]) for n, m in layers.items()})
    for key in weights[0]:
        assert torch.equal(weights[0][key] != 0, weights[1][key] != 0), key
    assert results[1].mean_relative_error < 0.95 * results[0].mean_relative_error


def test_refining_quantized_weights_is_refused():
    with pytest.raises(UsageError, match="refine_iterations=0 with bits"):
        PruneConfig("sparsegpt", "0.5", bits=4, options={"refine_iterations": 5})


@pytest.mark.parametrize("options", [{"percdamp": 1.5}, {"refine_iterations": -1}, {"blocksize": 0}])
def test_bad_solver_options_are_refused(options):
    (name, value), = options.items()
    with pytest.raises(UsageError, match=f"^{name}={value}: "):
        PruneConfig("sparsegpt", "0.5", options=options)


def test_the_re_solve_runs_on_each_experts_solve_hessian(monkeypatch):
    """With the pooled rule and several clusters, each expert's re-solve on its mask gets the
    Hessian its SparseGPT solve factored (its cluster's, pooled with the layer's), not the raw
    cluster Hessian."""
    factored, refined = [], []
    factor, refine = solvers.inverse_hessian_factor, solvers.refine_on_mask

    def recording_factor(H, *args, **kwargs):
        factored.extend(H.clone())
        return factor(H, *args, **kwargs)

    def recording_refine(W, W_hat, H, *args, **kwargs):
        refined.append(H[0].clone())
        return refine(W, W_hat, H, *args, **kwargs)
    monkeypatch.setattr(solvers, "inverse_hessian_factor", recording_factor)
    monkeypatch.setattr(solvers, "refine_on_mask", recording_refine)
    options = ExpansionOptions(clusters=3, kmeans_restarts=1, small_clusters="pooled", refine_iterations=2)
    prune_model(tiny_model("llama", layers=1), random_tokens(4, 32), PruneConfig("sparse-expansion", "0.5",
                options=options), progress=False)
    assert len(factored) == 2 * 3 and len(refined) == 3 * 3  # 2 groups' Hessians; 3 linears' experts
    for H in refined:
        assert any(torch.equal(H, solved) for solved in factored)


def test_cluster_statistics_add_without_atomics_off_the_cpu():
    """A GPU's index_add adds atomically, in an order that varies from run to run and rank to rank:
    the cluster sums (pass 1's mean, the pooled rule's means) and k-means' centroid sums take a
    one-hot product there. The meta device takes that path; its aten ops are checked, and on the
    CPU both ways give the same sums."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparse_expansion.methods.expansion import router as router_module
    from sparse_expansion.methods.expansion.stages import add_cluster_sums
    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))
    x, labels = torch.randn(50, 6), torch.randint(0, 3, (50,))
    with Record():
        sums = torch.zeros(3, 6, dtype=torch.float64, device="meta")
        add_cluster_sums(sums, x.to("meta"), labels.to("meta"), rows=16)
        router_module.sums_by_label(x.to("meta"), torch.stack([labels, labels.flip(0)]).to("meta"), 3)  # k-means
    assert ops and not any("index_add" in op or "scatter" in op for op in ops), sorted(set(ops))
    onehot = torch.nn.functional.one_hot(labels, 3).double().T @ x.double()
    sums = torch.zeros(3, 6, dtype=torch.float64)
    add_cluster_sums(sums, x, labels, rows=16)
    torch.testing.assert_close(sums, onehot, rtol=1e-5, atol=1e-6)  # fp32 within blocks


def test_the_solve_budget_counts_memory_the_caching_allocator_holds_unused(monkeypatch):
    """mem_get_info counts PyTorch's cached-but-free blocks as used: from the second block on, a
    budget from it alone would shrink by the cache and the run would chunk more than planned."""
    from sparse_expansion.methods.expansion.method import SOLVE_SHARE, solve_budget
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 12 * gib)
    assert solve_budget(None, torch.device("cuda"), reserve=gib) == int(SOLVE_SHARE * (10 + 18 - 1) * gib)
    assert solve_budget(5 * gib, torch.device("cuda")) == 5 * gib  # --max-memory as given


@pytest.mark.parametrize("max_cluster_tokens", [262_144, 100])  # every row, and a sample of 100 of 128
def test_the_router_sample_is_never_held_twice(monkeypatch, max_cluster_tokens):
    """Pass 1 writes the router's rows into one buffer; the fit gets a view of it, not a
    concatenation (which would hold 5.8 GB twice for a 7B down_proj)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparse_expansion.methods.expansion.method import ClusterStats
    cats, inside = [], [False]

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if inside[0] and func.overloadpacket.__name__ == "cat" and out.dim() == 2 and len(out) == sampled:
                cats.append(list(out.shape))  # rows of the whole sample, concatenated
            return out
    end_pass = ClusterStats.end_pass

    def watched(self):
        inside[0] = self.fit is None  # the end of pass 1, where the sample is handed to the fit
        try:
            return end_pass(self)
        finally:
            inside[0] = False
    monkeypatch.setattr(ClusterStats, "end_pass", watched)
    model, sampled = tiny_model("llama"), min(4 * 32, max_cluster_tokens)
    with Record():
        prune_model(model, random_tokens(4, 32), se_config(max_cluster_tokens=max_cluster_tokens), progress=False)
    assert cats == []
