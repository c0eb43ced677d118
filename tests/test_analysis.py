"""Neuron analysis: exact W1 to N(0, 1), empirical W1, mapping difficulty, and every experiment on
a tiny random Llama (token ids, not text) writing its files."""
import json
import math

import pytest
import torch

from sparse_expansion import analysis, cli, models
from sparse_expansion.storage import loading
from sparse_expansion.analysis import (AnalysisConfig, command, common, mapping_difficulty, run_experiments,
                                       w1_between, w1_to_gaussian)
from sparse_expansion.errors import UsageError
from tiny import random_tokens, tiny_model

stats = pytest.importorskip("scipy.stats")
integrate = pytest.importorskip("scipy.integrate")


# ---- W1 to the standard normal ---------------------------------------------------------------------

@pytest.mark.parametrize("x", [-3.0, -0.4, 0.0, 0.7, 2.5])
def test_w1_of_one_point_is_the_closed_form(x):
    """One sample at x: W1 = E|x − Z| = x(2Φ(x) − 1) + 2φ(x) (both infinite end intervals)."""
    got = w1_to_gaussian(torch.tensor([[x]], dtype=torch.float64), normalize=False).item()
    assert got == pytest.approx(x * (2 * stats.norm.cdf(x) - 1) + 2 * stats.norm.pdf(x), abs=1e-12)


def test_w1_of_a_large_gaussian_sample_is_near_zero():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200_000, 3, generator=g, dtype=torch.float64) * 3.0 + 5.0  # standardised inside
    assert (w1_to_gaussian(z) < 0.01).all()


def _quantile_sample(ppf, n=100_000):
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.tensor([ppf(float(q)) for q in u], dtype=torch.float64)


def _w1_integral(ppf):
    """∫₀¹ |F⁻¹(u) − Φ⁻¹(u)| du by quadrature, split at the median."""
    f = lambda u: abs(ppf(u) - stats.norm.ppf(u))  # noqa: E731
    return sum(integrate.quad(f, lo, hi, limit=500)[0] for lo, hi in ((0, 0.5), (0.5, 1)))


def test_w1_matches_the_integral_for_uniform_and_laplace():
    # unit-variance uniform on [−√3, √3] and Laplace with b = 1/√2
    uniform = lambda u: math.sqrt(3) * (2 * u - 1)  # noqa: E731
    b = 1 / math.sqrt(2)
    laplace = lambda u: b * math.log(2 * u) if u < 0.5 else -b * math.log(2 - 2 * u)  # noqa: E731
    for ppf, expected_approx in ((uniform, 0.1543), (laplace, 0.1454)):
        exact = _w1_integral(ppf)
        assert exact == pytest.approx(expected_approx, abs=1e-3)
        sample = _quantile_sample(ppf)[:, None]
        assert w1_to_gaussian(sample).item() == pytest.approx(exact, abs=1e-4)


def test_w1_matches_scipy_against_a_large_gaussian_sample():
    g = torch.Generator().manual_seed(1)
    samples = torch.stack([torch.distributions.Laplace(0.0, 1.0).sample((3000,)),
                           torch.rand(3000, generator=g),
                           torch.randn(3000, generator=g).exp()], dim=1).double()
    reference = torch.randn(2_000_000, generator=g, dtype=torch.float64).numpy()
    ours = w1_to_gaussian(samples)
    z = analysis.standardize(samples)
    for k in range(samples.shape[1]):
        assert ours[k].item() == pytest.approx(stats.wasserstein_distance(z[:, k].numpy(), reference), abs=3e-3)


def test_w1_is_per_column_and_invariant_to_affine_maps():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(500, 6, generator=g, dtype=torch.float64).pow(3)
    together = w1_to_gaussian(y, chunk_elements=1000)  # several chunks
    one_by_one = torch.cat([w1_to_gaussian(y[:, k:k + 1]) for k in range(6)])
    assert torch.allclose(together, one_by_one, atol=1e-12, rtol=0)
    assert torch.allclose(w1_to_gaussian(-7.0 * y + 3.0), together, atol=1e-9, rtol=0)  # N(0,1) is symmetric
    assert w1_to_gaussian(torch.ones(10, 1)).item() == pytest.approx(math.sqrt(2 / math.pi))


@pytest.mark.parametrize("sizes", [(400, 400), (400, 250)])
def test_w1_between_matches_scipy(sizes):
    g = torch.Generator().manual_seed(3)
    u = torch.randn(sizes[0], 3, generator=g)
    v = torch.randn(sizes[1], 3, generator=g).pow(3) + 0.2
    ours = w1_between(u, v)
    for k in range(3):
        assert ours[k].item() == pytest.approx(stats.wasserstein_distance(u[:, k].numpy(), v[:, k].numpy()), abs=1e-9)


# ---- mapping difficulty ------------------------------------------------------------------------------

def test_mapping_difficulty_of_a_linear_neuron_on_isotropic_inputs():
    """y = w·x + b, x ~ N(0, σ²I_d): Δx = √2σ·r·u with u uniform on the sphere, independent of r,
    |Δy| / ‖Δx‖ = ‖w‖·|u_w|, median |Δy| = √2σ‖w‖·Φ⁻¹(3/4). So
    MD = max‖Δx‖ / median|Δy| · E[|Δy| / ‖Δx‖] = max‖Δx‖ · E|u_1| / (√2σ Φ⁻¹(3/4)),
    E|u_1| = Γ(d/2) / (√π Γ((d+1)/2)) — the same for every w (scale and direction)."""
    d, sigma = 16, 0.5
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20_000, d, generator=g) * sigma
    W = torch.randn(5, d, generator=g) * torch.tensor([[0.1], [1.0], [3.0], [10.0], [-2.0]])
    y = x @ W.t() + 1.5
    md, info = mapping_difficulty(x, y, pairs=50_000, seed=0)
    e_abs_u = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
    expected = info["max_input_distance"] * e_abs_u / (math.sqrt(2) * sigma * stats.norm.ppf(0.75))
    assert info["pairs"] == 50_000 and info["dropped_pairs"] == 0
    assert torch.allclose(md, torch.full_like(md, expected), rtol=0.02)


def test_mapping_difficulty_exact_in_one_dimension():
    """d = 1: |Δy| = |w|·|Δx| pair by pair, so MD = max|Δx| / median|Δx| exactly, for any w ≠ 0;
    identical inputs are dropped; a constant neuron gets NaN."""
    x = torch.tensor([[0.0], [1.0], [3.0], [3.0], [7.0], [-2.0]], dtype=torch.float64)
    y = torch.cat([2.0 * x, -0.5 * x + 4.0, torch.ones_like(x)], dim=1)
    md, info = mapping_difficulty(x, y, pairs=2000, seed=1)
    g = torch.Generator().manual_seed(1)  # the documented draw: i uniform, j = i + U{1..T−1} mod T
    i = torch.randint(0, 6, (2000,), generator=g)
    j = (i + torch.randint(1, 6, (2000,), generator=g)) % 6
    dx = (x[i] - x[j]).abs().flatten()
    dx = dx[dx > 0]
    expected = float(dx.max() / dx.median())
    assert info["dropped_pairs"] == 2000 - dx.numel() > 0
    assert md[0].item() == pytest.approx(expected, rel=1e-12) and md[1].item() == pytest.approx(expected, rel=1e-12)
    assert math.isnan(md[2].item())


# ---- experiments on a tiny random model --------------------------------------------------------------

TINY = AnalysisConfig(block=1, sparsity=0.8, clusters=4, kmeans_restarts=2, pairs=3000, show=2,
                      cluster_counts=(1, 2, 4), sweep_rates=(0.0, 0.5, 0.9), ablation_random_seeds=2,
                      batch_size=4, progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    model = tiny_model("llama", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("analysis")
    results = run_experiments(model, random_tokens(8, 48, seed=1), random_tokens(8, 48, seed=2), out,
                              config=TINY)
    return model, before, out, results


def test_every_experiment_writes_its_tables(tiny_run):
    _, _, out, results = tiny_run
    assert set(results) == set(analysis.EXPERIMENTS)
    for stem in ("neurons", "histograms", "clusters", "sparsity_sweep", "ablation"):
        assert (out / f"{stem}.csv").stat().st_size > 0
        data = json.loads((out / f"{stem}.json").read_text())
        assert str(out / f"{stem}.csv") in data["files"]
    if analysis.matplotlib_available():  # figures are skipped (with a note) without matplotlib
        for png in ("neurons_distance", "neurons_mapping", "histograms", "clusters", "sparsity_sweep", "ablation"):
            assert (out / f"{png}.png").stat().st_size > 0


def test_neuron_summary(tiny_run):
    _, _, out, results = tiny_run
    s = results["neurons"]["linears"]
    assert set(s) == {"mlp.gate_proj", "mlp.up_proj"}
    for v in s.values():
        assert v["neurons"] == 128 and v["wasserstein_neurons"] == 4  # round(3% of 128)
        assert v["threshold_w1"] >= v["w1_gaussian_all"]["median"]
        assert -1 <= v["mapping_difficulty"]["spearman_with_w1"] <= 1
    rows = (out / "neurons.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 128
    assert rows[0].split(",")[:4] == ["linear", "neuron", "rank", "wasserstein"]
    # held-out tokens: 8 windows x (48 - 1 skipped position)
    assert results["neurons"]["tokens"] == 8 * 47


def test_one_cluster_is_sparsegpt_and_histograms_rank_by_distance(tiny_run):
    _, _, _, results = tiny_run
    assert all(c["max_abs_diff_1_cluster_vs_sparsegpt"] == 0 for c in results["clusters"]["checks"].values())
    assert [r["clusters"] for r in results["clusters"]["rows"]] == [1, 2, 4, 1, 2, 4]
    rows = results["histograms"]["neurons"]
    assert len(rows) == 2 * TINY.show
    for a, b in zip(rows[::2], rows[1::2]):
        assert a["w1_gaussian_dense"] >= b["w1_gaussian_dense"]
        assert a["w1_sparsegpt_to_dense"] > 0 and a["w1_expansion_to_dense"] > 0
    sweep = [r for r in results["sparsity-sweep"]["rows"]
             if r["linear"] == "mlp.up_proj" and r["method"] == "sparsegpt"]
    assert [r["sparsity"] for r in sweep] == [0.0, 0.5, 0.9]


def test_ablation_reports_every_selection_and_restores_the_model(tiny_run):
    model, before, _, results = tiny_run
    a = results["ablation"]
    assert set(a["results"]) == {"dense", "wasserstein", "random", "random2", "variance", "weight_norm"}
    assert all(r["perplexity"] > 1 for r in a["results"].values())
    assert a["rows_per_linear"] == {"mlp.gate_proj": 4, "mlp.up_proj": 4}
    assert any(r["perplexity"] != a["results"]["dense"]["perplexity"] for k, r in a["results"].items() if k != "dense")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_layer_variants_prune_only_a_copy():
    model = tiny_model("llama", seed=3)
    w = models.decoder_blocks(model)[0].mlp.up_proj.weight.clone()
    layer = analysis.analyze_layer(model, random_tokens(4, 32), random_tokens(4, 32, seed=5),
                                   AnalysisConfig(block=0, linears=("mlp.up_proj",), kmeans_restarts=1, progress=False))
    out = layer.outputs("sparsegpt", 0.5)["mlp.up_proj"]
    assert out.shape == (4 * 31, 128) and not torch.equal(out, layer.dense("mlp.up_proj"))
    assert torch.equal(models.decoder_blocks(model)[0].mlp.up_proj.weight, w)
    with pytest.raises(UsageError, match="one FFN input group"):
        analysis.resolve_linears(model, ("mlp.up_proj", "mlp.down_proj"))


# ---- command line -------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--experiment", "pictures"], "comma-separated list of neurons"),
    (["--sparsity", "2:4"], "unstructured rates"),
    (["--top-percent", "0"], "percentage in (0, 100]"),
    (["--block", "30"], "blocks 0 to 29"),
    (["--linears", "mlp.gate_proj,mlp.down_proj"], "one FFN input group"),
])
def test_bad_analyze_arguments(extra, message, tmp_path, capsys, monkeypatch):
    for module in (loading, command):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("model loaded before checks"))
    assert cli.main(["analyze", "smollm2", "--out", str(tmp_path / "o"), "--no-plots", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_analyze_command_end_to_end(tmp_path, smollm2):
    _, tokenizer = smollm2
    folder = tmp_path / "model"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {k} tells the story number {k} of a small town by the river, "
                                f"where people {k % 7} times a day walk their dogs." for k in range(200)))
    out = tmp_path / "analysis"
    code = cli.main(["analyze", str(folder), "--out", str(out), "--calib", str(text), "--nsamples", "4",
                     "--seqlen", "32", "--eval-windows", "4", "--ablation-nsamples", "2", "--ablation-seqlen", "32",
                     "--ablation-eval-windows", "2", "--pairs", "500", "--clusters", "2", "--cluster-counts", "1,2",
                     "--kmeans-restarts", "1", "--experiment", "histograms,ablation", "--no-plots", "--quiet"])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["experiments"] == ["histograms", "ablation"] and run["data"]["held_out"] == [4, 32]
    assert (out / "histograms.csv").exists() and (out / "ablation.csv").exists() and not list(out.glob("*.png"))


def test_without_matplotlib_figures_are_skipped_or_refused(monkeypatch, capsys, tmp_path):
    for module in (common, command):
        monkeypatch.setattr(module, "matplotlib_available", lambda: False)
    monkeypatch.setattr(common, "_PLOT_NOTE_SHOWN", False)
    assert common._pyplot(AnalysisConfig(plots=None)) is None  # library default: tables only, with a note
    assert "pip install matplotlib" in capsys.readouterr().out
    with pytest.raises(UsageError, match="pip install matplotlib"):
        common._pyplot(AnalysisConfig(plots=True))
    for module in (loading, command):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("model loaded before checks"))
    assert cli.main(["analyze", "smollm2", "--out", str(tmp_path / "o")]) == 2
    assert "--no-plots" in capsys.readouterr().err
