import pytest
import torch

from sparse_expansion import models
from sparse_expansion.driver import PruneConfig, prune_model
from sparse_expansion.errors import UsageError
from sparse_expansion.sparsity import Sparsity
from tiny import FAMILIES, random_tokens, tiny_model


def target_names(model, targets):
    return {f"block{b}.{n}" for b in range(len(models.decoder_blocks(model)))
            for g in models.target_groups(model, targets) for n in g}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_each_ffn_linear_once(family, monkeypatch):
    model = tiny_model(family)
    calls = []
    real_set = models.set_linear_weight
    monkeypatch.setattr("sparse_expansion.methods.base.set_linear_weight",
                        lambda m, w: (calls.append(id(m)), real_set(m, w)))
    reports = prune_model(model, random_tokens(4, 32), PruneConfig("sparsegpt", Sparsity(0.5)), progress=False).layers
    assert [r.layer for r in reports] == sorted(target_names(model, "ffn"), key=[r.layer for r in reports].index)
    assert len(calls) == len(set(calls)) == len(target_names(model, "ffn"))
    for b, block in enumerate(models.decoder_blocks(model)):
        for g in models.target_groups(model, "ffn"):
            for name in g:
                w = models.linear_weight(block.get_submodule(name))
                assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
        for g in models.target_groups(model, "all")[:1]:  # attention stays dense by default
            assert (models.linear_weight(block.get_submodule(g[0])) != 0).all()
    assert all(r.relative_error > 0 for r in reports)
    assert torch.isfinite(model(random_tokens(1, 16)).logits).all()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_targets_all_adds_attention(family):
    model = tiny_model(family)
    reports = prune_model(model, random_tokens(2, 16), PruneConfig("wanda", Sparsity.parse("2:4"), targets="all"),
                          progress=False).layers
    assert {r.layer for r in reports} == target_names(model, "all")
    assert all(r.sparsity == 0.5 for r in reports)


def test_pruned_block_outputs_feed_the_next_block(monkeypatch):
    """The second block's Hessian must come from the pruned first block, not the dense one."""
    calib = random_tokens(2, 16)
    seen = {}
    from sparse_expansion.methods import Method
    real = Method.prune_group

    def spy(self, block, layers, stats, where):
        seen.setdefault(where, stats.H.clone())
        return real(self, block, layers, stats, where)
    monkeypatch.setattr(Method, "prune_group", spy)
    prune_model(tiny_model("llama"), calib, PruneConfig("magnitude", Sparsity(0.9)), progress=False)
    pruned_H = seen["block1"]
    seen.clear()
    prune_model(tiny_model("llama"), calib, PruneConfig("magnitude", Sparsity(0.0)), progress=False)
    assert not torch.allclose(pruned_H, seen["block1"])


def test_unsupported_architecture_is_a_clear_error():
    class Fake(torch.nn.Module):
        class config:
            model_type = "bert"
    with pytest.raises(UsageError, match="unsupported architecture 'bert'"):
        models.decoder_blocks(Fake())


def test_nm_needs_divisible_columns():
    with pytest.raises(UsageError, match="not divisible by M=5"):
        prune_model(tiny_model("llama"), random_tokens(1, 8), PruneConfig("magnitude", Sparsity.parse("2:5")),
                    progress=False)


def test_capture_keeps_every_keyword_argument():
    model = tiny_model("llama")
    (hidden, args, kwargs), = models.capture_block_inputs(model, [random_tokens(2, 8)])
    assert hidden.shape == (2, 8, 64)
    assert "position_embeddings" in kwargs
    out = models.block_output(models.decoder_blocks(model)[0](hidden, *args, **kwargs))
    assert out.shape == hidden.shape


def test_capture_can_store_every_input_elsewhere():
    """--offload-activations keeps hidden states, masks and position embeddings off the model's device."""
    (hidden, args, kwargs), = models.capture_block_inputs(tiny_model("llama"), [random_tokens(2, 8)], "meta")
    tensors = [hidden, *kwargs["position_embeddings"]] + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    assert all(t.is_meta for t in tensors)


def test_each_block_visits_the_device_alone(monkeypatch):
    """Sequential onloading: with an explicit device, every decoder block is sent there before its
    work and back home after it, one at a time, and a block only runs while it is there. (Here the
    device and home are both the CPU, so the test follows the protocol through `.to` calls.)"""
    model = tiny_model("llama", layers=3)
    blocks = models.decoder_blocks(model)
    on_device, events = set(), []

    def tracking(i, real_to):
        def to(*args, **kwargs):
            target = torch.device(args[0]) if args and not isinstance(args[0], torch.dtype) else None
            if target is not None:
                (on_device.add if target == torch.device("cpu:0") else on_device.discard)(i)
                events.append((i, str(target)))
            return real_to(*args, **kwargs)
        return to
    for i, block in enumerate(blocks):
        block.to = tracking(i, block.to)
        block.register_forward_pre_hook(lambda m, a, i=i: events.append((i, "run", sorted(on_device))))
    prune_model(model, random_tokens(2, 16), PruneConfig("sparsegpt"), progress=False, device="cpu:0")
    runs = [e for e in events if e[1] == "run"]
    assert runs and all(e[2] == [e[0]] for e in runs), runs  # a block runs alone on the device
    assert [e for e in events if e[1] != "run"] == [(i, d) for i in range(3) for d in ("cpu:0", "cpu")]
    assert on_device == set()


def test_the_progress_bar_hears_each_pass_and_group(monkeypatch):
    """Inside a block the bar says what runs: the collecting pass, each further pass of a group
    (Sparse Expansion's chunks: one pass per cluster Hessian that fits --max-memory), the pruning."""
    from sparse_expansion import driver
    from sparse_expansion.methods.expansion.stages import cluster_cost
    from sparse_expansion.methods import ExpansionOptions
    heard = []
    monkeypatch.setattr(driver, "tqdm", lambda *a, **k: _Bar(heard))
    options = ExpansionOptions(clusters=3, kmeans_restarts=1, pca_factor=8, max_cluster_tokens=16)  # sampled: passes
    config = PruneConfig("sparse-expansion", "0.5", max_memory=cluster_cost(128, 128), options=options)
    prune_model(tiny_model("llama"), random_tokens(2, 16), config)
    assert "block 0: collecting" in heard and "block1.mlp.down_proj: pass 3" in heard
    assert "block1.mlp.gate_proj/mlp.up_proj: pruning" in heard


class _Bar(list):
    def __init__(self, heard):
        super().__init__(range(2))
        self.heard = heard

    def set_postfix_str(self, text):
        self.heard.append(text)

    def set_postfix(self, **kw):
        pass


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "opt", "gpt2"])
def test_attention_runs_once_per_block_and_the_result_is_unchanged(family, monkeypatch):
    """The propagate pass replays the attention outputs of the first pass (no target lies in the
    attention) and the first pass stops at the last hooked linear: the pruned model is bitwise the
    one that recomputing everything gives."""
    from contextlib import nullcontext
    from sparse_expansion import driver
    calib, config = random_tokens(4, 16), PruneConfig("sparsegpt", Sparsity(0.5), batch_size=2)
    attention = models.target_groups(tiny_model(family), "all")[0][0].split(".")[0]
    last = models.target_groups(tiny_model(family), "ffn")[-1][0]

    def run():
        model, calls = tiny_model(family), {"attention": 0, "last": 0}
        for key, name in (("attention", attention), ("last", last)):
            mine = {id(b.get_submodule(name)) for b in models.decoder_blocks(model)}
            real = type(models.decoder_blocks(model)[0].get_submodule(name)).forward

            def counted(self, *a, _r=real, _k=key, _mine=mine, **k):
                calls[_k] += id(self) in _mine
                return _r(self, *a, **k)
            monkeypatch.setattr(type(models.decoder_blocks(model)[0].get_submodule(name)), "forward", counted)
        prune_model(model, calib, config, progress=False)
        monkeypatch.undo()
        return model, calls

    model, calls = run()
    batches, blocks = 2, len(models.decoder_blocks(model))
    assert calls == {"attention": batches * blocks, "last": batches * blocks}  # collect + propagate would be 2x
    monkeypatch.setattr(driver.UnchangedOutputs, "replaying", lambda self, device: nullcontext())
    reference, ref_calls = run()
    assert ref_calls["attention"] == 2 * batches * blocks
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_attention_returning_its_probabilities_is_recomputed():
    """Eager attention also returns its [B, heads, L, L] probabilities: larger than the block's
    input, so it is not kept; the run still works."""
    from sparse_expansion.driver import UnchangedOutputs, collect_inputs
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    block = models.decoder_blocks(model)[0]
    cached = models.capture_block_inputs(model, list(random_tokens(4, 16).split(2)))
    unchanged = UnchangedOutputs(block, ["mlp.gate_proj", "mlp.down_proj"])
    collect_inputs(block, cached, "cpu", {block.mlp.down_proj: lambda x: None}, unchanged=unchanged, record=True)
    assert unchanged.outputs == {}
    sdpa = tiny_model("llama")
    block = models.decoder_blocks(sdpa)[0]
    unchanged = UnchangedOutputs(block, ["mlp.gate_proj", "mlp.down_proj"])
    collect_inputs(block, cached, "cpu", {block.mlp.down_proj: lambda x: None}, unchanged=unchanged, record=True)
    assert list(unchanged.outputs) == [block.self_attn] and len(unchanged.outputs[block.self_attn]) == 2


def test_onloading_runs_each_block_on_the_device_only_while_it_runs(monkeypatch):
    """Evaluating a model larger than the GPU: what lies outside the blocks moves to the device,
    each block visits it for its forward and goes back; the logits are those of the whole model.
    (Here the device is the CPU too: the hooks' moves are recorded.)"""
    from sparse_expansion import commands
    from sparse_expansion.models import decoder_blocks, onload_blocks
    model, ids = tiny_model("llama"), random_tokens(2, 16)
    with torch.no_grad():
        whole = model(ids).logits
    moves = []
    for b, block in enumerate(decoder_blocks(model)):
        move = block.to
        monkeypatch.setattr(block, "to", lambda device, _b=b, _move=move: (moves.append((_b, str(device))),
                                                                            _move(device))[1])
    onload_blocks(model, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, whole)
    assert [b for b, _ in moves] == [0, 0, 1, 1] and [d for _, d in moves][1::2] == ["cpu", "cpu"]

    placed = []  # eval's choice: whole when it fits the free memory, else block by block
    monkeypatch.setattr(commands, "onload_blocks", lambda m, device: placed.append("blocks"))
    monkeypatch.setattr(model, "to", lambda device: placed.append("whole"))
    need = commands.scoring_bytes(model, 4, 16)
    for free, onload in ((need + 1, "auto"), (need - 1, "auto"), (need + 1, "yes"), (need - 1, "no")):
        monkeypatch.setattr(commands, "free_device_bytes", lambda device, _free=free: _free)
        commands.place_for_scoring(model, "cuda", onload, 4, 16)
    assert placed == ["whole", "blocks", "blocks", "whole"]
