"""Every public option of every method changes the pruned model when it is changed, as its --help
says; an option that cannot is listed in UNCHANGING with the reason. A new option fails
test_every_option_is_covered until it is added to one of the two."""
from dataclasses import fields
from functools import lru_cache

import pytest
import torch

from sparse_expansion.config import PruneConfig
from sparse_expansion.driver import prune_model
from sparse_expansion.methods import METHODS
from tiny import random_tokens, tiny_model

# small settings for a fast run of each method; the option under test is changed on top of them
BASE = {"sparsegpt": {}, "sparse-expansion": {"clusters": 3, "kmeans_restarts": 1, "pca_factor": 8}}
# (method, option, changed value, other settings the option needs to matter)
CHANGES = [
    ("sparsegpt", "blocksize", 32, {}),  # masks chosen per 32 columns instead of over all 64
    ("sparsegpt", "percdamp", 0.5, {}),
    ("sparsegpt", "refine_iterations", 3, {}),
    ("sparse-expansion", "blocksize", 32, {}),
    ("sparse-expansion", "percdamp", 0.5, {"small_clusters": "shrink"}),  # pooled damps with its own default
    ("sparse-expansion", "refine_iterations", 0, {}),  # the default re-solves
    ("sparse-expansion", "clusters", 2, {}),
    ("sparse-expansion", "pca_factor", 4, {}),
    ("sparse-expansion", "kmeans_restarts", 4, {}),
    ("sparse-expansion", "small_clusters", "shrink", {}),
    ("sparse-expansion", "shrink_tokens", 5.0, {}),
    ("sparse-expansion", "expert_damping", 0.2, {}),
    ("sparse-expansion", "min_cluster_tokens", 8, {"small_clusters": "merge"}),  # 128 tokens: clusters < 64
    ("sparse-expansion", "max_cluster_tokens", 40, {}),  # the router fit on a sample of 40 of 128 tokens
]
UNCHANGING = {
    ("sparse-expansion", "kmeans_backend"): "where k-means runs (torch, or cuML on a GPU), not what it computes; "
                                            "auto is torch on a CPU, and cuML needs a GPU",
}


@lru_cache(maxsize=None)
def pruned_weights(method: str, settings: tuple) -> dict[str, torch.Tensor]:
    model = tiny_model("llama")
    config = PruneConfig(method, "0.5", options=METHODS[method].Options(**dict(settings)))
    prune_model(model, random_tokens(4, 32), config, progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_option_is_covered():
    for name, cls in METHODS.items():
        covered = {o for m, o, _, _ in CHANGES if m == name} | {o for m, o in UNCHANGING if m == name}
        assert covered == {f.name for f in fields(cls.Options)}, name


@pytest.mark.parametrize("method,option,value,needs", CHANGES, ids=[f"{m}-{o}" for m, o, _, _ in CHANGES])
def test_changing_an_option_changes_the_model(method, option, value, needs):
    base = {**BASE[method], **needs}
    assert getattr(METHODS[method].Options(**base), option) != value
    before = pruned_weights(method, tuple(sorted(base.items())))
    after = pruned_weights(method, tuple(sorted({**base, option: value}.items())))
    assert not same(before, after)
