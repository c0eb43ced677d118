"""Several ranks (torch.distributed, gloo on CPU) give the one-rank model bit for bit."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_expansion import distributed
from sparse_expansion.config import PruneConfig
from sparse_expansion.driver import prune_model
from sparse_expansion.errors import UsageError
from sparse_expansion.faults import KILL_ENV
from sparse_expansion.methods import ExpansionOptions
from tiny import random_tokens, tiny_model


def _prune(rank: int, world: int, folder: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in every process
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    model = tiny_model("llama")
    config = PruneConfig("sparse-expansion", "0.5", options=ExpansionOptions(clusters=5, kmeans_restarts=2, pca_factor=8))
    result = prune_model(model, random_tokens(4, 32), config, progress=False)
    torch.save({"state": model.state_dict(), "layers": result.to_dict()["layers"]}, f"{folder}/rank{rank}-of-{world}.pt")
    if world > 1:
        dist.destroy_process_group()
    torch.set_num_threads(threads)


def test_two_ranks_give_the_one_rank_model(tmp_path):
    """5 clusters over 2 ranks (3 + 2 experts each): the same experts, routers and reports."""
    _prune(0, 1, str(tmp_path))  # one rank: here, with one thread
    mp.spawn(_prune, args=(2, str(tmp_path)), nprocs=2)
    one, two, other = (torch.load(tmp_path / name) for name in ("rank0-of-1.pt", "rank0-of-2.pt", "rank1-of-2.pt"))
    assert one["state"].keys() == two["state"].keys() == other["state"].keys()
    for key, value in one["state"].items():
        assert torch.equal(value, two["state"][key]) and torch.equal(value, other["state"][key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]  # noqa: E731
    assert strip(one["layers"]) == strip(two["layers"])
    assert {len(r["damping"]) for r in two["layers"]} == {5}


def torchrun_prune(folder, corpus, out, *extra, ranks=2, **env):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", str(ranks), "-m", "sparse_expansion.cli", "prune",
           str(folder), "--calib", str(corpus), "--nsamples", "2", "--seqlen", "32", "--quiet",
           "--method", "sparse-expansion", "--clusters", "3", "--kmeans-restarts", "1", "--output", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_torchrun_writes_one_output_from_rank_zero(tiny_folder, small_corpus, tmp_path):
    run = torchrun_prune(tiny_folder, small_corpus, tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("pruned 6 linears") == 1  # one report, from rank 0
    assert sorted(p.name for p in (tmp_path / "out").glob("experts-*")) == ["experts-00000.safetensors",
                                                                           "experts-00001.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_rank_that_dies_stops_every_rank_and_leaves_no_output(tiny_folder, small_corpus, tmp_path):
    run = torchrun_prune(tiny_folder, small_corpus, tmp_path / "out", **{KILL_ENV: "pruned:0@1"})
    assert run.returncode != 0
    assert re.search(r"Root Cause[\s\S]*rank\s*: 1 \(local_rank: 1\)[\s\S]*SIGKILL", run.stderr)  # torchrun names it
    assert not (tmp_path / "out").exists()


def test_a_killed_one_rank_run_resumes_with_two_ranks_to_the_same_model(tiny_folder, small_corpus, tmp_path):
    """The result does not depend on the number of ranks, so neither does the checkpoint."""
    assert torchrun_prune(tiny_folder, small_corpus, tmp_path / "whole", ranks=1).returncode == 0
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    killed = torchrun_prune(tiny_folder, small_corpus, tmp_path / "out", *ckpt, ranks=1, **{KILL_ENV: "block:0"})
    assert killed.returncode != 0 and not (tmp_path / "out").exists()
    resumed = torchrun_prune(tiny_folder, small_corpus, tmp_path / "out", *ckpt, ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    for f in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "out" / f.name).read_bytes(), f.name


def test_world_sizes_that_do_not_divide_the_work_are_refused():
    distributed.check_split("sparsegpt", None, 1)
    distributed.check_split("sparse-expansion", 16, 16)
    with pytest.raises(UsageError, match="does not split across ranks"):
        distributed.check_split("sparsegpt", None, 2)
    with pytest.raises(UsageError, match="use at most 4 ranks"):
        distributed.check_split("sparse-expansion", 4, 8)
