"""Layer-wise sparsity allocation (OWL): its arithmetic, its outlier ratio, and a run that gives
each block its own rate through every method."""
import json

import pytest
import torch

from sparse_expansion import cli
from sparse_expansion.allocation import ColumnNorms, outlier_ratio, owl_rates
from sparse_expansion.config import PruneConfig
from sparse_expansion.driver import prune_model
from sparse_expansion.errors import UsageError
from sparse_expansion.storage.outputs import METADATA
from tiny import random_tokens, tiny_model


def test_owl_rates_span_two_lambda_around_the_target_and_keep_its_mean():
    rates = owl_rates([0.01, 0.03, 0.02, 0.05], rate=0.6, lam=0.1)
    assert sum(rates) / 4 == pytest.approx(0.6)
    assert max(rates) - min(rates) == pytest.approx(0.2)
    assert rates.index(min(rates)) == 3 and rates.index(max(rates)) == 0  # most outliers: most kept
    assert owl_rates([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]  # nothing to tell the blocks apart


def test_column_norms_are_the_root_mean_square_of_each_input_column():
    """‖x_j‖ as OWL's scores use it: sqrt(mean x_j²) over every row of every batch."""
    batches = [torch.randn(2, 5, 3), 3 * torch.randn(1, 7, 3)]  # unequal batches: a running mean
    norms = ColumnNorms(3, "cpu")
    for x in batches:
        norms.add_batch(x)
    rows = torch.cat([x.reshape(-1, 3) for x in batches])
    torch.testing.assert_close(norms.norms(), rows.square().mean(0).sqrt())


def test_outlier_ratio_counts_scores_above_m_times_their_mean():
    W = torch.tensor([[1.0, 1.0, 1.0, 10.0]])
    norms = torch.tensor([1.0, 1.0, 1.0, 2.0])  # scores 1, 1, 1, 20: mean 5.75
    assert outlier_ratio([W], [norms], 3.0) == 0.25
    assert outlier_ratio([W], [norms], 4.0) == 0.0
    assert outlier_ratio([W, W], [norms, torch.ones(4)], 3.0) == 0.125  # scores pooled over the block's linears


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "sparse-expansion"])
def test_owl_gives_each_block_its_rate_and_the_target_overall(method):
    model = tiny_model("llama", layers=3)
    options = {"clusters": 2, "kmeans_restarts": 1} if method == "sparse-expansion" else None
    config = PruneConfig(method, "0.6", allocation="owl", owl_m=2.0, owl_lambda=0.1, options=options)
    result = prune_model(model, random_tokens(4, 32), config, progress=False)
    per_block = {}
    for r in result.layers:
        per_block.setdefault(r.block, []).append(r.sparsity)
    rates = [sum(v) / len(v) for _, v in sorted(per_block.items())]
    assert max(rates) - min(rates) == pytest.approx(0.2, abs=0.01)
    assert result.sparsity == pytest.approx(0.6, abs=0.015)  # Wanda rounds each 64- or 128-wide row down


def test_owl_over_a_block_range_is_normalised_over_that_range():
    """--blocks 1:3: the dense model's ratios of those blocks, ordered as in a whole run, and
    the target reached over the range."""
    calib = random_tokens(4, 32)
    whole = prune_model(tiny_model("llama", layers=3), calib,
                        PruneConfig("magnitude", "0.5", allocation="owl", owl_m=2.0), progress=False)
    part = prune_model(tiny_model("llama", layers=3), calib,
                       PruneConfig("magnitude", "0.5", allocation="owl", owl_m=2.0, blocks=(1, 3)), progress=False)
    order = lambda res: [r.sparsity for r in sorted(res.layers, key=lambda r: (r.block, r.layer))]  # noqa: E731
    whole_rates, part_rates = order(whole)[3:], order(part)
    assert (part_rates[0] - part_rates[-1] > 0) == (whole_rates[0] - whole_rates[-1] > 0)
    assert sum(part_rates) / len(part_rates) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("kwargs,message", [
    (dict(sparsity="2:4", allocation="owl"), "N:M"),
    (dict(allocation="owl", owl_lambda=0.5), "owl_lambda=0.5: "),
    (dict(allocation="owl", owl_m=0), "owl_m=0: "),
    (dict(allocation="layerwise"), "allocation=.layerwise.: "),
])
def test_bad_allocations_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=message):
        PruneConfig("sparsegpt", **{"sparsity": "0.5", **kwargs})


def test_cli_records_the_allocation(tiny_folder, small_corpus, tmp_path):
    out = tmp_path / "owl"
    assert cli.main(["prune", str(tiny_folder), "--calib", str(small_corpus), "--nsamples", "2", "--seqlen", "32",
                     "--quiet", "--method", "wanda", "--allocation", "owl", "--owl-m", "2", "--output", str(out)]) == 0
    config = json.loads((out / METADATA).read_text())["config"]
    assert (config["allocation"], config["owl_m"], config["owl_lambda"]) == ("owl", 2.0, 0.08)
