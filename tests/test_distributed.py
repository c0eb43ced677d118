"""Several ranks (torch.distributed, gloo on CPU): Sparse Expansion gives the one-rank model bit
for bit; the data-parallel methods give it up to the rounding of the Hessian's sum."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_expansion import distributed
from sparse_expansion.config import PruneConfig
from sparse_expansion.driver import prune_model
from sparse_expansion.errors import UsageError
from sparse_expansion.faults import KILL_ENV
from sparse_expansion.methods import ExpansionOptions, HessianStats, method_class
from tiny import random_tokens, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _in_ranks(rank: int, work, world: int, folder: str, *args) -> None:
    """Run work(*args) as `rank` of `world` (gloo, one thread: the same arithmetic in every
    process) and save what it returns to folder/rank{rank}-of-{world}.pt."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    torch.save(work(*args), f"{folder}/rank{rank}-of-{world}.pt")
    if world > 1:
        dist.destroy_process_group()
    torch.set_num_threads(threads)


def _one_and_two_ranks(tmp_path, work, *args) -> tuple[dict, dict, dict]:
    _in_ranks(0, work, 1, str(tmp_path), *args)  # one rank: here
    mp.spawn(_in_ranks, args=(work, 2, str(tmp_path), *args), nprocs=2)
    return tuple(torch.load(tmp_path / name) for name in ("rank0-of-1.pt", "rank0-of-2.pt", "rank1-of-2.pt"))


def _prune_tiny(method: str, options) -> dict:
    model = tiny_model("llama")
    config = PruneConfig(method, "0.5", options=options)
    result = prune_model(model, random_tokens(4, 32), config, progress=False)
    return {"state": model.state_dict(), "layers": result.to_dict()["layers"]}


def _prune_tiny_fitting_on_rank_0_only(method: str, options) -> dict:
    """_prune_tiny where only rank 0 may fit a router (rank 1's fit would differ: a different
    device, cuML, atomics): the others receive rank 0's."""
    from sparse_expansion.methods.expansion import stages
    if distributed.rank() == 1:
        def refuse(*args, **kwargs):
            raise AssertionError("rank 1 fitted a router of its own")
        stages.fit_group_router = refuse
    return _prune_tiny(method, options)


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


def test_two_ranks_give_the_one_rank_model(tmp_path):
    """5 clusters over 2 ranks (3 + 2 experts each): the same experts, routers and reports; only
    rank 0 fits the routers (rank 1 may not), every rank routes by them."""
    one, two, other = _one_and_two_ranks(tmp_path, _prune_tiny_fitting_on_rank_0_only, "sparse-expansion",
                                         ExpansionOptions(clusters=5, kmeans_restarts=2, pca_factor=8))
    assert any("router" in key for key in one["state"])
    assert one["state"].keys() == two["state"].keys() == other["state"].keys()
    for key, value in one["state"].items():
        assert torch.equal(value, two["state"][key]) and torch.equal(value, other["state"][key]), key
    assert _without_seconds(one["layers"]) == _without_seconds(two["layers"])
    assert {len(r["damping"]) for r in two["layers"]} == {5}


def _exchange_tensors() -> dict:
    """gather_in_rank_order and gather_to_leader of nested tensors of several dtypes and shapes,
    different on every rank; every pickled object is recorded."""
    pickled, originals = [], {name: getattr(dist, name) for name in
                              ("all_gather_object", "gather_object", "broadcast_object_list")}
    for name, send in originals.items():
        def record(obj, *args, _send=send, _name=name, **kwargs):
            pickled.append(args[0] if _name == "all_gather_object" else obj)
            return _send(obj, *args, **kwargs)
        setattr(dist, name, record)
    r = distributed.rank()
    mine = {"parts": [{"values": torch.arange(5 + r, dtype=torch.bfloat16), "mask": torch.ones(3, 2 + r,
                                                                                            dtype=torch.bool)}],
            "terms": [(torch.tensor(1.5 + r, dtype=torch.float64), torch.zeros(0, 4))], "zeros": 7 + r,
            "strided": torch.arange(12, dtype=torch.int64).reshape(3, 4).T}
    try:
        leader = distributed.gather_to_leader([mine["strided"] + r])
        everyone = distributed.gather_in_rank_order(mine)
    finally:
        for name, send in originals.items():
            setattr(dist, name, send)
    return {"all": everyone, "leader": leader, "pickled": len(pickled), "pickled_tensors": _holds_tensor(pickled)}


def _holds_tensor(obj) -> bool:
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return isinstance(obj, torch.Tensor) or any(_holds_tensor(v) for v in items)


def _collectives() -> dict:
    return {"exchange": _exchange_tensors(), "reduce": _reduce_unequal_rows()}


@pytest.fixture(scope="module")
def collectives(tmp_path_factory) -> tuple[dict, dict, dict]:
    """The collective helpers run once by one rank and by two (one spawn for the tests below)."""
    return _one_and_two_ranks(tmp_path_factory.mktemp("collectives"), _collectives)


def test_ranks_exchange_tensors_as_tensors_not_pickles(collectives):
    """Experts (compressed parts, error terms) and checkpoint activations cross ranks as one byte
    buffer per rank: every rank gets every rank's tensors back exactly (dtype, shape, values), in
    rank order, and nothing pickled on the way holds a tensor."""
    one, two, other = (c["exchange"] for c in collectives)
    assert len(one["all"]) == 1 and len(two["all"]) == len(other["all"]) == 2
    for got in (two["all"], other["all"]):
        for r, part in enumerate(got):
            assert part["zeros"] == 7 + r
            values, mask = part["parts"][0]["values"], part["parts"][0]["mask"]
            assert values.dtype == torch.bfloat16 and torch.equal(values, torch.arange(5 + r, dtype=torch.bfloat16))
            assert mask.dtype == torch.bool and mask.shape == (3, 2 + r) and bool(mask.all())
            num, den = part["terms"][0]
            assert num.dtype == torch.float64 and num.shape == () and float(num) == 1.5 + r and den.shape == (0, 4)
            assert torch.equal(part["strided"], torch.arange(12).reshape(3, 4).T)
    assert [t.tolist() for t in two["leader"]] == [(torch.arange(12).reshape(3, 4).T + r).tolist() for r in (0, 1)]
    assert other["leader"] is None
    assert two["pickled"] and other["pickled"] and not two["pickled_tensors"] and not other["pickled_tensors"]


def _reduce_unequal_rows() -> dict:
    """The mean of x xᵀ over 8 rows: rank 0 of two holds 3 of them, rank 1 the other 5."""
    x = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3) / 7 - 1
    rows = x if distributed.world_size() == 1 else (x[:3] if distributed.rank() == 0 else x[3:])
    H, count = (rows.T @ rows / rows.shape[0])[None], torch.tensor([rows.shape[0]])
    distributed.all_reduce_mean(H, count)
    return {"H": H, "count": count}


def test_rank_means_weigh_each_rank_by_its_rows(collectives):
    one, two, other = (c["reduce"] for c in collectives)
    assert int(two["count"]) == int(other["count"]) == 8
    torch.testing.assert_close(two["H"], one["H"])
    torch.testing.assert_close(other["H"], one["H"])


def _solve_rows() -> dict:
    """SparseGPT's row split on one Hessian (37 rows: 19 + 18), unstructured, 2:4 and 4-bit, and
    the all-reduce of a Hessian whose batches the ranks share."""
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(1, 37, 72, generator=g), torch.randn(300, 72, generator=g)
    out = {}
    for sparsity, bits in (("0.5", None), ("2:4", None), ("0.6", 4)):
        method = method_class("sparsegpt")(PruneConfig("sparsegpt", sparsity, bits=bits))
        stats = HessianStats(72, "cpu")
        stats.add_batch(X)  # every rank the whole X: the same Hessian
        method.prepare_group(stats, "layer")
        out[(sparsity, bits)] = method.prune_linear(W, stats)[0]
    shared = HessianStats(72, "cpu")
    for xb in X.split(50)[distributed.my_share(6)]:
        shared.add_batch(xb)
    shared.end_pass()
    return {"weights": out, "H": shared.H, "count": shared.count}


def test_two_ranks_solve_sparsegpt_rows_to_the_one_rank_weights(tmp_path):
    """Each rank solves its share of the rows; the masks are chosen over every rank's rows, so the
    weights are those of one process, bit for bit, on every rank. The shared Hessian is the
    one-rank Hessian up to rounding."""
    one, two, other = _one_and_two_ranks(tmp_path, _solve_rows)
    for key, W_hat in one["weights"].items():
        assert torch.equal(W_hat, two["weights"][key]) and torch.equal(W_hat, other["weights"][key]), key
        assert (W_hat == 0).sum() > 0
    assert one["count"].item() == two["count"].item() == other["count"].item() == 300
    torch.testing.assert_close(two["H"], one["H"], rtol=1e-6, atol=1e-6)
    assert torch.equal(two["H"], other["H"])


def test_two_data_parallel_ranks_give_the_one_rank_sparsegpt_model(tmp_path):
    """Each rank runs 2 of the 4 calibration windows through every block; the all-reduced Hessians
    differ from one process's by rounding only: the same masks, weights within 1e-4."""
    one, two, other = _one_and_two_ranks(tmp_path, _prune_tiny, "sparsegpt", None)
    for key, value in one["state"].items():
        assert torch.equal(two["state"][key], other["state"][key]), key  # every rank holds the same model
        assert torch.equal(value == 0, two["state"][key] == 0), key
        torch.testing.assert_close(two["state"][key], value, rtol=1e-4, atol=1e-5)
    assert [r["tokens"] for r in two["layers"]] == [r["tokens"] for r in one["layers"]] == [128] * 6


EXPANSION = ("--method", "sparse-expansion", "--clusters", "3", "--kmeans-restarts", "1")


def torchrun_prune(folder, corpus, out, *extra, ranks=2, method=EXPANSION, **env):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", str(ranks), "-m", "sparse_expansion.cli", "prune",
           str(folder), "--calib", str(corpus), "--nsamples", "2", "--seqlen", "32", "--batch-size", "1", "--quiet",
           *method, "--output", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          cwd=ROOT)  # workers start with the repository root first on sys.path


@pytest.mark.smoke
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


def test_a_killed_data_parallel_run_resumes_to_the_same_model(tiny_folder, small_corpus, tmp_path):
    """Two SparseGPT ranks, one calibration window each: rank 0 checkpoints both ranks'
    activations, and each rank takes its own back on resume."""
    sparsegpt = ("--method", "sparsegpt")
    assert torchrun_prune(tiny_folder, small_corpus, tmp_path / "whole", method=sparsegpt).returncode == 0
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    killed = torchrun_prune(tiny_folder, small_corpus, tmp_path / "out", *ckpt, method=sparsegpt,
                            **{KILL_ENV: "block:0@0"})
    assert killed.returncode != 0 and not (tmp_path / "out").exists()
    resumed = torchrun_prune(tiny_folder, small_corpus, tmp_path / "out", *ckpt, method=sparsegpt)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    for f in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "out" / f.name).read_bytes(), f.name


def test_world_sizes_that_do_not_divide_the_work_are_refused():
    distributed.check_split("sparsegpt", None, 1, 1)
    distributed.check_split("sparsegpt", None, 4, 4)
    distributed.check_split("sparse-expansion", 16, 16, 1)
    with pytest.raises(UsageError, match="4 ranks for 2 calibration batches"):
        distributed.check_split("sparsegpt", None, 4, 2)
    with pytest.raises(UsageError, match="use at most 4 ranks"):
        distributed.check_split("sparse-expansion", 4, 8, 16)


def test_the_process_group_waits_as_long_as_asked(monkeypatch):
    """Collectives wait 60 minutes unless $SPARSE_EXPANSION_DIST_TIMEOUT says otherwise (torch's
    10 would stop the other ranks while rank 0 writes a large output alone)."""
    import datetime
    seen = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.append((backend, kw["timeout"])))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.init_from_env("cpu")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "150")
    distributed.init_from_env("cpu")
    assert seen == [("gloo", datetime.timedelta(minutes=60)), ("gloo", datetime.timedelta(minutes=150))]
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(UsageError, match="give minutes"):
        distributed.init_from_env("cpu")
