"""A checkpoint resumes only the run that wrote it: every identity key, changed alone, is refused
(before the model loads), and what may change (--quiet, --overwrite, ...) is accepted."""
import shutil

import pytest
import torch

from sparse_expansion.storage import checkpoint
from sparse_expansion import cli, commands
from sparse_expansion.config import PruneConfig
from sparse_expansion.errors import UsageError
from sparse_expansion.reports import PruneResult

# flag changes -> what the refusal names: the first identity key (in sorted order, the calibration
# hash last) that differs, as `key=` or as the flags that set it
CHANGES = {
    "sparsity": (["--sparsity", "0.6"], "sparsity="),
    "method": (["--method", "sparsegpt"], "method="),
    "bits": (["--bits", "4"], "bits="),
    "targets": (["--targets", "all"], "targets="),
    "batch_size": (["--batch-size", "1"], "batch_size="),
    "sequential": (["--sequential"], "sequential="),
    "blocks": (["--blocks", "1:2"], "blocks="),
    "seed": (["--seed", "1"], "seed=0 but this command has seed=1"),
    "nsamples": (["--nsamples", "3"], "--nsamples 2 --seqlen 32 but this command has --nsamples 3 --seqlen 32"),
    "seqlen": (["--seqlen", "16"], "--nsamples 2 --seqlen 32 but this command has --nsamples 2 --seqlen 16"),
    "calib": (["OTHER"], "calibrated on other tokens (--calib, --encoding or the text changed)"),
    "model": (["OTHER"], "model="),
    "clusters": (["--clusters", "3"], "options.clusters="),
    "blocksize": (["--blocksize", "64"], "options.blocksize="),
    "percdamp": (["--percdamp", "0.02"], "options.percdamp="),
    "dtype": (["--dtype", "bfloat16"], "dtype="),
    "shrink_tokens": (["--shrink-tokens", "100"], "options.shrink_tokens="),
    "max_cluster_tokens": (["--max-cluster-tokens", "50"], "options.max_cluster_tokens="),
}


@pytest.fixture
def saved_run(tiny_folder, small_corpus, tmp_path, monkeypatch):
    """A checkpoint (block 0 done) of a small Sparse Expansion run; returns its argument builder."""
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: pytest.fail("model loaded before the identity check"))

    def args(*extra, model=tiny_folder, corpus=small_corpus):
        return ["prune", str(model), "--calib", str(corpus), "--nsamples", "2", "--seqlen", "32",
                "--method", "sparse-expansion", "--output", str(tmp_path / "out"),
                "--checkpoint-dir", str(tmp_path / "ckpt"), *extra]
    _, _, ckpt, _ = commands.start_run(cli._parser().parse_args(args()))
    ckpt.save(0, torch.nn.Module(), [], [torch.zeros(1, 2, 3)], PruneResult())
    return args


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_resume_with_one_thing_changed_is_refused(saved_run, change, tiny_folder, small_corpus, tmp_path, capsys):
    flags, named = CHANGES[change]
    kwargs = {}
    if "OTHER" in flags:
        if change == "model":
            shutil.copytree(tiny_folder, tmp_path / "model-copy")
            kwargs["model"] = tmp_path / "model-copy"
        else:
            (tmp_path / "other.txt").write_text(small_corpus.read_text()[5000:])
            kwargs["corpus"] = tmp_path / "other.txt"
        flags = []
    capsys.readouterr()
    assert cli.main(saved_run(*flags, **kwargs)) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "repeat the first command's arguments" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_another_package_version_is_refused(saved_run, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "__version__", "9.9.9")
    capsys.readouterr()
    assert cli.main(saved_run()) == 2
    assert "holds a run with version=" in capsys.readouterr().err


def test_what_does_not_change_the_result_may_change(saved_run, capsys):
    for extra in ([], ["--quiet"], ["--offload-activations"], ["--overwrite"]):
        _, _, ckpt, _ = commands.start_run(cli._parser().parse_args(saved_run(*extra)))
        assert ckpt.next_block == 1
    assert "resuming from" in capsys.readouterr().err


def test_a_run_with_a_block_range_resumes(tiny_folder, small_corpus, tmp_path):
    args = ["prune", str(tiny_folder), "--calib", str(small_corpus), "--nsamples", "2", "--seqlen", "32",
            "--blocks", "1:2", "--output", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ckpt")]
    _, _, ckpt, _ = commands.start_run(cli._parser().parse_args(args))
    ckpt.save(0, torch.nn.Module(), [], [torch.zeros(1, 2, 3)], PruneResult())
    _, _, again, _ = commands.start_run(cli._parser().parse_args(args))
    assert again.next_block == 1


def test_the_library_checks_the_identity_too(tmp_path):
    calib = torch.arange(64).view(2, 32)
    ckpt = checkpoint.Checkpoint(tmp_path / "ckpt", "some/model")
    ckpt.bind(PruneConfig("sparsegpt"), calib, "cpu", torch.float32)
    ckpt.save(0, torch.nn.Module(), [], [torch.zeros(1, 2, 3)], PruneResult())
    reopened = checkpoint.Checkpoint(tmp_path / "ckpt", "some/model")
    reopened.bind(PruneConfig("sparsegpt"), calib, "cpu", torch.float32)
    with pytest.raises(UsageError, match="calibrated on other tokens"):
        reopened.bind(PruneConfig("sparsegpt"), calib.flip(0), "cpu", torch.float32)
    with pytest.raises(UsageError, match="device='cpu' but this command has device='meta'"):
        reopened.bind(PruneConfig("sparsegpt"), calib, "meta", torch.float32)
    with pytest.raises(UsageError, match="dtype='float32' but this command has dtype='bfloat16'"):
        reopened.bind(PruneConfig("sparsegpt"), calib, "cpu", torch.bfloat16)
