"""The Python API: prune, save and load as functions, with the CLI's checks."""
import json

import pytest
import torch

import sparse_expansion as se
from sparse_expansion.errors import UsageError
from sparse_expansion.methods.expansion.experts import SparseExpertLinear
from tiny import random_tokens, tiny_model


def test_prune_save_load_from_a_reference(tiny_folder, small_corpus, tmp_path):
    model, result = se.prune(str(tiny_folder), method="sparse-expansion", sparsity="0.5", calib=str(small_corpus),
                             nsamples=4, seqlen=32, clusters=3, kmeans_restarts=1, progress=False)
    assert result.config["options"]["clusters"] == 3 and len(result.layers) == 6
    out = se.save(model, tmp_path / "se3", tokenizer=se.load_tokenizer(str(tiny_folder)), result=result)
    meta = json.loads((out / "sparse_expansion.json").read_text())
    assert meta["config"]["method"] == "sparse-expansion" and len(meta["layers"]) == 6
    loaded, tokenizer = se.load(out)
    assert isinstance(loaded.model.layers[0].mlp.gate_proj, SparseExpertLinear) and tokenizer is not None
    ids = random_tokens(2, 16, vocab=len(tokenizer))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_prune_with_an_output_streams_experts_to_it_like_the_command_line(tiny_folder, small_corpus, tmp_path):
    """output=DIR: each finished block's experts go to DIR and leave memory; the folder equals
    what `save` writes, and the returned model reads its experts from it (same logits)."""
    from sparse_expansion.storage.lazy import LazyExperts
    args = dict(method="sparse-expansion", calib=str(small_corpus), nsamples=4, seqlen=32, clusters=3,
                kmeans_restarts=1, progress=False)
    kept, _ = se.prune(str(tiny_folder), **args)
    streamed, result = se.prune(str(tiny_folder), **args, output=tmp_path / "se3")
    assert sorted(f.name for f in (tmp_path / "se3").glob("experts-*")) == ["experts-00000.safetensors",
                                                                             "experts-00001.safetensors"]
    assert sum(isinstance(m, LazyExperts) for m in streamed.modules()) == 6
    assert not any(isinstance(m, SparseExpertLinear) for m in streamed.modules())
    assert [p.name for p in tmp_path.iterdir()] == ["se3"]  # no partial folder left
    loaded, tokenizer = se.load(tmp_path / "se3")
    ids = random_tokens(2, 16, vocab=len(tokenizer))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, kept(ids).logits)
        assert torch.equal(loaded(ids).logits, kept(ids).logits)
    meta = json.loads((tmp_path / "se3" / "sparse_expansion.json").read_text())
    assert meta["command"] == "api" and len(meta["layers"]) == len(result.layers) == 6
    with pytest.raises(UsageError, match="output='.*se3' already exists; choose another folder or pass "
                                         "overwrite=True"):
        se.prune(str(tiny_folder), **args, output=tmp_path / "se3")
    se.prune(str(tiny_folder), calib=str(small_corpus), nsamples=4, seqlen=32, progress=False,
             output=tmp_path / "sgpt")  # a baseline: nothing to spill, saved all the same
    assert json.loads((tmp_path / "sgpt" / "sparse_expansion.json").read_text())["config"]["method"] == "sparsegpt"


def test_prune_a_model_object_with_token_ids():
    model = tiny_model("llama")
    dense = model.model.layers[0].mlp.down_proj.weight.clone()
    same, result = se.prune(model, method="sparsegpt", sparsity="2:4", calib=random_tokens(4, 32), percdamp=0.02,
                            progress=False)
    assert same is model and result.config["options"]["percdamp"] == 0.02
    w = model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(w, dense) and ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="sparsegpt", clusters=4), "sparsegpt has no option clusters"),
    (dict(method="wanda", sparsity="3:2"), "sparsity"),
    (dict(method="sparsegpt", calib="wiki"), "pass tokenizer"),
    (dict(method="sparsegpt", calib=torch.rand(2, 8)), "token ids"),
    (dict(method="sparsegpt", dtype="bfloat16"), "applies to a model reference"),
])
def test_bad_api_arguments_name_the_fix(kwargs, message):
    with pytest.raises(UsageError, match=message):
        se.prune(tiny_model("llama"), **{"calib": random_tokens(2, 8), **kwargs})


def test_prune_checks_its_arguments_in_api_terms():
    model, calib = tiny_model("llama"), random_tokens(4, 16)
    for kwargs, message in [({"blocks": "0:x"}, "blocks='0:x': give \\(start, end\\)"),
                            ({"blocks": (0, 1, 2)}, "blocks=\\(0, 1, 2\\)"),
                            ({"nsamples": 0, "calib": "wiki"}, "nsamples=0: give a positive integer"),
                            ({"seqlen": 2.5, "calib": "wiki"}, "seqlen=2.5")]:
        with pytest.raises(UsageError, match=message):
            se.prune(model, method="magnitude", **{"calib": calib, **kwargs}, progress=False)
    _, result = se.prune(model, method="magnitude", calib=calib, blocks="1:2", progress=False)
    assert {r.block for r in result.layers} == {1}


@pytest.mark.parametrize("kwargs, message", [
    (dict(blocks=(0, 40)), "blocks=(0, 40): the model has blocks 0 to 2; give (start, end) with"),
    (dict(targets="mlp"), "targets='mlp': use ffn or all"),
    (dict(batch_size=0), "batch_size=0: must be at least 1"),
    (dict(sparsity=1.5), "sparsity='1.5': the rate must lie in [0, 1)"),
    (dict(bits=9), "bits=9: joint quantization supports 2 to 8 bits; omit bits for none"),
    (dict(percdamp=2.0), "percdamp=2.0: use a fraction in (0, 1)"),
    (dict(method="sparse-expansion", clusters=100), "clusters=100 with 32 calibration tokens: at most one cluster "
                                                    "per token; lower clusters or raise nsamples / seqlen"),
    (dict(device="tpu"), "device='tpu': use auto, cpu or cuda"),
])
def test_errors_from_python_name_keywords_not_flags(kwargs, message):
    """The checks the CLI shares with the API speak the caller's language: `blocks=(0, 40)`,
    not `--blocks 0:40`."""
    with pytest.raises(UsageError) as error:
        se.prune(tiny_model("llama"), **{"method": "sparsegpt", "calib": random_tokens(2, 16), **kwargs},
                 progress=False)
    assert message in str(error.value) and "--" not in str(error.value), str(error.value)


def test_save_refusals_name_keywords(tmp_path):
    model = tiny_model("llama")
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="output='.*taken' already exists; choose another folder or pass "
                                         "overwrite=True"):
        se.save(model, tmp_path / "taken")


def test_the_api_and_the_command_line_have_one_default_method():
    import inspect

    from sparse_expansion import cli
    from sparse_expansion.config import PruneConfig
    api_default = inspect.signature(se.prune).parameters["method"].default
    cli_default = cli._parser().parse_args(["prune", "smollm2", "--output", "out"]).method
    assert api_default == cli_default == PruneConfig().method == "sparsegpt"
