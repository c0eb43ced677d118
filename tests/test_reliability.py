"""Long runs: checkpoints and resume after SIGKILL, atomic output, determinism, NaN/inf, memory."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_expansion import cli, commands
from sparse_expansion.storage.checkpoint import Checkpoint
from sparse_expansion.config import PruneConfig
from sparse_expansion.driver import prune_model
from sparse_expansion.errors import NumericalError
from sparse_expansion.faults import KILL_ENV
from sparse_expansion.methods import ExpansionOptions, Method
from sparse_expansion.reports import PruneResult
from sparse_expansion.storage.outputs import write_atomically
from sparse_expansion.sparsity import Sparsity
from tiny import random_tokens, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def prune_cmd(model, corpus, out, *extra):
    return [sys.executable, "-m", "sparse_expansion.cli", "prune", str(model), "--calib", str(corpus),
            "--nsamples", "4", "--seqlen", "64", "--output", str(out), "--quiet", *extra]


def run(cmd, **env):
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT)  # as CI starts it


def same_model(a, b):
    files = sorted(f.name for f in a.glob("*.safetensors"))
    assert files and files == sorted(f.name for f in b.glob("*.safetensors"))
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]  # noqa: E731
    meta_a, meta_b = (json.loads((f / "sparse_expansion.json").read_text()) for f in (a, b))
    assert strip(meta_a["layers"]) == strip(meta_b["layers"])


@pytest.mark.parametrize("method,extra,kill_at", [("sparsegpt", [], "block:0"),
                                                  ("sparsegpt", ["--bits", "4"], "block:0"),
                                                  ("sparse-expansion", [], "checkpoint:1"), ("sparsegpt", [], "save")])
def test_killed_run_resumes_to_the_same_model(tiny_folder, small_corpus, tmp_path, capsys, method, extra, kill_at):
    """SIGKILL (in a subprocess) after block 0 is committed, while block 1's checkpoint is
    written, or while the output is written: no folder at --output (only the partial one the
    run was filling); re-running the command
    resumes (or, with every block saved, only saves) and gives the uninterrupted model bit for
    bit (quantized: the restored block's integers too). Sparse Expansion fits its routers on a
    100-token sample of the 256, over two passes."""
    args = ["--method", method, "--seed", "5", *extra]
    if method == "sparse-expansion":
        args += ["--clusters", "4", "--kmeans-restarts", "2", "--max-cluster-tokens", "100"]
    assert cli.main(prune_cmd(tiny_folder, small_corpus, tmp_path / "uninterrupted", *args)[3:]) == 0
    out, ckpt = tmp_path / "resumed", tmp_path / "ckpt"
    killed = run(prune_cmd(tiny_folder, small_corpus, out, *args, "--checkpoint-dir", str(ckpt)), **{KILL_ENV: kill_at})
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    assert len(list(tmp_path.glob(".resumed.partial-*"))) == 1  # the killed run's; the next run removes it
    done = 2 if kill_at == "save" else 1
    assert json.loads((ckpt / "checkpoint.json").read_text())["next_block"] == done
    capsys.readouterr()
    assert cli.main(prune_cmd(tiny_folder, small_corpus, out, *args, "--checkpoint-dir", str(ckpt))[3:]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {ckpt}: blocks 0-{done - 1} done" in err
    if done == 1:  # the tiny model has 2 blocks: the estimate is block 0's measured time, once
        seconds = json.loads((ckpt / "checkpoint.json").read_text())["result"]["blocks"][0]["seconds"]
        assert f"at {seconds:.1f} s a block so far, about {seconds / 60:.1f} min left for blocks 1-1" in err, err
    assert not list(tmp_path.glob(".resumed.partial-*"))
    same_model(tmp_path / "uninterrupted", out)
    meta = json.loads((out / "sparse_expansion.json").read_text())
    assert meta["arguments"]["seed"] == meta["config"]["seed"] == 5
    assert [b["block"] for b in meta["blocks"]] == [0, 1] and all(b["peak_rss_bytes"] > 0 for b in meta["blocks"])
    assert [f.name for f in ckpt.glob("activations-*")] == ["activations-0001.safetensors"]


def test_checkpoint_of_other_arguments_is_refused(tiny_folder, small_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sparse_expansion.commands.load_model", lambda *a, **k: pytest.fail("model loaded"))
    base = ["prune", str(tiny_folder), "--calib", str(small_corpus), "--nsamples", "2", "--seqlen", "32",
            "--output", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ckpt")]
    _, _, ckpt, _ = commands.start_run(cli._parser().parse_args(base + ["--sparsity", "0.5"]))
    ckpt.save(0, torch.nn.Module(), [], [torch.zeros(1, 2, 3)], PruneResult())
    capsys.readouterr()
    assert cli.main(base + ["--sparsity", "0.6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sparsity='0.5' but this command has sparsity='0.6'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


BAD_CHECKPOINT_DIRS = {
    "a_file": (lambda d: d.write_text("x"), "is a file"),
    "a_foreign_folder": (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), "holds no checkpoint"),
    "corrupted_state": (lambda d: (d.mkdir(), (d / "checkpoint.json").write_text("{")), "corrupted"),
    "other_format": (lambda d: (d.mkdir(), (d / "checkpoint.json").write_text('{"format": "v0"}')),
                     "unknown checkpoint format"),


    "inside_output": (lambda d: None, "lies in --output"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINT_DIRS))
def test_bad_checkpoint_dir(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sparse_expansion.commands.load_model", lambda *a, **k: pytest.fail("model loaded"))
    make, message = BAD_CHECKPOINT_DIRS[case]
    ckpt = tmp_path / "out" / "ckpt" if case == "inside_output" else tmp_path / "ckpt"
    make(ckpt)
    assert cli.main(["prune", "smollm2", "--output", str(tmp_path / "out"), "--checkpoint-dir", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_folder_killed_before_its_first_commit_is_reused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / ".activations-0000.safetensors.tmp").write_bytes(b"half")
    assert Checkpoint(tmp_path / "ckpt", "a-model").next_block == 0


def test_stale_partial_outputs_of_dead_runs_are_removed(tmp_path):
    stale = tmp_path / ".out.partial-999999999"
    stale.mkdir()
    write_atomically(str(tmp_path / "out"), lambda folder: (folder / "f").write_text("done"))
    assert (tmp_path / "out" / "f").read_text() == "done" and not stale.exists()


def se_config(seed=0, **kw):
    options = ExpansionOptions(**{"clusters": 4, "kmeans_restarts": 2, "pca_factor": 8, **kw})
    return PruneConfig("sparse-expansion", Sparsity(0.5), seed=seed, options=options)


def test_same_seed_same_model_other_seed_other_routers():
    calib = random_tokens(4, 32)
    a, b, c = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    for model, seed in ((a, 3), (b, 3), (c, 4)):
        prune_model(model, calib, se_config(seed=seed), progress=False)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    router = "model.layers.0.mlp.gate_proj.router.centroids"
    assert not torch.equal(a.state_dict()[router], c.state_dict()[router])


@pytest.mark.parametrize("where,tensor,message", [
    (0, "embed", "block0 input"),
    (1, "post_attention_layernorm", "block1.mlp.gate_proj/mlp.up_proj input"),
    (0, "act", "block0.mlp.down_proj input"),
])
@pytest.mark.parametrize("method", ["sparsegpt", "sparse-expansion"])
def test_nan_or_inf_activations_stop_the_run_naming_the_layer(where, tensor, message, method):
    model = tiny_model("llama")
    block = model.model.layers[where]
    if tensor == "embed":
        model.model.embed_tokens.weight.data[:] = float("nan")
    elif tensor == "act":  # inf from up_proj reaches down_proj's input only
        block.mlp.up_proj.weight.data[0] = float("inf")
    else:
        block.post_attention_layernorm.weight.data[3] = float("nan")
    config = se_config() if method == "sparse-expansion" else PruneConfig(method, Sparsity(0.5))
    with pytest.raises(NumericalError, match=re.escape(message)):
        prune_model(model, random_tokens(2, 16), config, progress=False)


def test_nan_model_exits_1_and_writes_nothing(tmp_path, smollm2, capsys):
    _, tokenizer = smollm2
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.model.layers[1].post_attention_layernorm.weight.data[0] = float("nan")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    code = cli.main(["prune", str(tmp_path / "model"), "--nsamples", "2", "--seqlen", "32", "--quiet",
                     "--output", str(tmp_path / "out")])
    assert code == 1
    assert "block1.mlp.gate_proj/mlp.up_proj input: activations contain NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["sparsegpt", "sparse-expansion"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_use_fp32_hessians_and_keep_their_dtype(method, dtype, monkeypatch):
    model = tiny_model("llama").to(dtype)
    hessians = []
    for cls in (Method, type(se_config().make_method())):
        real = cls.prune_group
        monkeypatch.setattr(cls, "prune_group", lambda self, block, layers, stats, where, real=real:
                            (hessians.append(getattr(stats, "H_full", stats.H).dtype),
                             real(self, block, layers, stats, where))[1])
    config = se_config() if method == "sparse-expansion" else PruneConfig(method, Sparsity(0.5))
    prune_model(model, random_tokens(2, 16), config, progress=False)
    assert hessians and set(hessians) == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert torch.isfinite(model(random_tokens(1, 8)).logits).all()


def test_bounded_sample_fits_routers_in_two_passes():
    calib = random_tokens(4, 32)  # 128 tokens per layer
    lin = torch.nn.Linear(16, 8)
    stats = se_config(max_cluster_tokens=50).make_method().collector({"lin": lin}, tokens=128)
    x = torch.randn(128, 16)
    for xb in x.split(40):
        stats.add_batch(xb)
    assert sum(stats.sizes) == 50 and stats.sample.shape == (50, 16) and stats.end_pass()
    for xb in x.split(40):
        stats.add_batch(xb)
    assert not stats.end_pass() and int(stats.counts.sum()) == 128
    assert stats.router_tokens == 50
    # with one cluster the sampled router changes nothing: exactly SparseGPT's Hessian and weights
    a, b = tiny_model("llama"), tiny_model("llama")
    prune_model(a, calib, PruneConfig("sparsegpt", Sparsity(0.5), options={"refine_iterations": 5}), progress=False)
    result = prune_model(b, calib, se_config(clusters=1, max_cluster_tokens=20), progress=False)  # re-solve: 5
    assert all(r.extras["router_tokens"] == 20 for r in result.layers)
    for name in ("gate_proj", "up_proj", "down_proj"):
        for i in range(2):
            dense = a.model.layers[i].mlp.get_submodule(name).weight
            assert torch.equal(b.model.layers[i].mlp.get_submodule(name).expert_weight(0), dense)


def test_offloaded_activations_and_block_memory_report():
    calib = random_tokens(4, 32)
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = prune_model(a, calib, se_config(), progress=False)
    rb = prune_model(b, calib, se_config(), progress=False, offload_activations=True)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    assert [r.relative_error for r in ra.layers] == [r.relative_error for r in rb.layers]
    assert [blk.block for blk in rb.blocks] == [0, 1]
    assert all(blk.peak_rss_bytes > 100 * 2**20 and blk.seconds > 0 for blk in rb.blocks)


def test_a_hessian_that_never_factors_names_the_layer():
    from sparse_expansion import solvers
    H = torch.eye(6)[None].clone()
    H[0, 2, 3] = H[0, 3, 2] = float("nan")
    with pytest.raises(NumericalError,
                       match=r"block4\.mlp\.down_proj: the Hessian does not factor even with damping 100"):
        solvers.inverse_hessian_factor(H, 0.01, "block4.mlp.down_proj")


def test_baseline_checkpoints_are_compressed_and_restore_bit_for_bit(tmp_path):
    """Pruned linears of the baselines are checkpointed as values + bitmask (about half the dense
    size at 50%); a restored block equals the pruned one bit for bit."""
    calib = random_tokens(2, 16)
    pruned = tiny_model("llama")
    config = PruneConfig("wanda", Sparsity(0.5))
    prune_model(pruned, calib, config, progress=False, checkpoint=Checkpoint(tmp_path / "ckpt", "tiny"))
    weights = [pruned.model.layers[0].get_submodule(n).weight
               for n in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert not any(torch.signbit(w[w == 0]).any() for w in weights)  # pruned weights are +0.0
    dense = sum(w.numel() * w.element_size() for w in weights)
    assert (tmp_path / "ckpt" / "block-0000.safetensors").stat().st_size < 0.6 * dense
    restored = tiny_model("llama")
    reopened = Checkpoint(tmp_path / "ckpt", "tiny")
    reopened.bind(config, calib, "cpu", torch.float32)
    reopened.restore(restored, [(torch.zeros(2, 16, 64), (), {})])  # one batch, as saved
    for (name, a), (_, b) in zip(pruned.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name


def test_collecting_waits_for_the_device_once_per_pass_not_per_batch():
    """The driver's NaN/inf check adds each batch's sum on the device and looks at it once per
    pass: 8 batches cost the host no more waits (reads of a device scalar) in the driver than 2.
    (The torch reference of the Hessian accumulation reads counts per batch; its Triton wrapper,
    what a GPU runs, waits for nothing: test_kernels.)"""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    class Waits(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero", "item"):
                ours = [f.filename for f in traceback.extract_stack() if "sparse_expansion" in f.filename]
                Waits.count += bool(ours) and ours[-1].endswith("driver.py")
            return func(*args, **(kwargs or {}))

    def waits(batches: int) -> int:
        Waits.count = 0
        config = PruneConfig("sparsegpt", Sparsity(0.5), batch_size=1)
        with Waits():
            prune_model(tiny_model("llama"), random_tokens(batches, 16), config, progress=False)
        return Waits.count
    assert waits(8) == waits(2) > 0
