"""Flags and error paths end to end: each one run through the CLI (or its library call) on the
tiny Llama folder and the 400-document corpus of conftest.py."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparse_expansion import cli, demo
from sparse_expansion.config import PruneConfig
from sparse_expansion.driver import prune_model
from sparse_expansion.errors import UsageError
from sparse_expansion.methods.expansion.experts import SparseExpertLinear
from sparse_expansion.storage.loading import load_model
from sparse_expansion.storage.outputs import load_pruned, write_atomically
from tiny import random_tokens, tiny_model


def prune(model, corpus, out, *extra):
    return cli.main(["prune", str(model), "--calib", str(corpus), "--nsamples", "2", "--seqlen", "32", "--quiet",
                     "--output", str(out), *extra])


def error_of(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def tensors(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_sequential_prunes_down_proj_on_the_pruned_gate_and_up():
    calib = random_tokens(2, 16)
    plain, seq = tiny_model("llama"), tiny_model("llama")
    prune_model(plain, calib, PruneConfig("sparsegpt"), progress=False)
    prune_model(seq, calib, PruneConfig("sparsegpt", sequential=True), progress=False)
    mlp_a, mlp_b = plain.model.layers[0].mlp, seq.model.layers[0].mlp
    assert torch.equal(mlp_a.gate_proj.weight, mlp_b.gate_proj.weight)
    assert torch.equal(mlp_a.up_proj.weight, mlp_b.up_proj.weight)
    assert not torch.equal(mlp_a.down_proj.weight, mlp_b.down_proj.weight)


def test_bits_through_the_cli_leave_at_most_two_to_the_bits_levels_per_row(tiny_folder, small_corpus, tmp_path):
    assert prune(tiny_folder, small_corpus, tmp_path / "out", "--bits", "3", "--format", "dense") == 0
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    W = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    levels = [len(set(row[row != 0].tolist())) for row in W]
    assert max(levels) <= 8 and min(levels) >= 2
    assert json.loads((tmp_path / "out" / "sparse_expansion.json").read_text())["config"]["bits"] == 3


def test_offloaded_activations_through_the_cli_give_the_same_model(tiny_folder, small_corpus, tmp_path):
    assert prune(tiny_folder, small_corpus, tmp_path / "a") == 0
    assert prune(tiny_folder, small_corpus, tmp_path / "b", "--offload-activations") == 0
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overwrite_replaces_the_existing_output(tiny_folder, small_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert prune(tiny_folder, small_corpus, out, "--method", "magnitude") == 0
    capsys.readouterr()
    assert prune(tiny_folder, small_corpus, out, "--method", "wanda") == 2
    assert "already exists" in error_of(capsys)
    assert prune(tiny_folder, small_corpus, out, "--method", "wanda", "--overwrite") == 0
    assert json.loads((out / "sparse_expansion.json").read_text())["config"]["method"] == "wanda"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or old folder left


@pytest.mark.parametrize("blocks,message", [
    ("1:x", "write START:END"), ("2", "write START:END"), ("1:1", "the model has blocks 0 to 2"),
    ("0:3", "0 <= START < END <= 2"), ("-1:1", "0 <= START < END <= 2")])
def test_bad_block_ranges(tiny_folder, small_corpus, tmp_path, capsys, blocks, message):
    assert prune(tiny_folder, small_corpus, tmp_path / "out", f"--blocks={blocks}") == 2
    assert message in error_of(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("extra,message", [
    (["--device", "cuda"], "--device cuda: no CUDA device is available; use --device cpu"),
    (["--device", "tpu"], "--device tpu: use auto, cpu or cuda"),
    (["--method", "sparse-expansion", "--kmeans-backend", "cuml"], "--kmeans-backend cuml needs a CUDA device")])
def test_devices_that_are_not_here_are_refused(tiny_folder, small_corpus, tmp_path, capsys, extra, message):
    assert prune(tiny_folder, small_corpus, tmp_path / "out", *extra) == 2
    assert message in error_of(capsys)


@pytest.mark.parametrize("command", ["prune", "eval"])
def test_a_bad_kernel_backend_variable_is_a_usage_error(tiny_folder, small_corpus, tmp_path, capsys, monkeypatch,
                                                        command):
    monkeypatch.setenv("SPARSE_EXPANSION_KERNELS", "cuda")
    args = [str(tiny_folder), "--quiet"] + (["--output", str(tmp_path / "o")] if command == "prune" else [])
    assert cli.main([command, *args]) == 2
    assert "SPARSE_EXPANSION_KERNELS='cuda': use one of auto, torch, triton" in error_of(capsys)


@pytest.fixture(scope="module")
def expert_folder(tiny_folder, small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts") / "se"
    assert prune(tiny_folder, small_corpus, out, "--method", "sparse-expansion", "--clusters", "2",
                 "--kmeans-restarts", "1") == 0
    return out


def _corrupt_format(folder):
    meta = json.loads((folder / "sparse_expansion.json").read_text())
    meta["experts"]["format"] = "bitmask-v9"
    (folder / "sparse_expansion.json").write_text(json.dumps(meta))


def _drop_dense_weight(folder, forget_checksums: bool = False):
    dense = load_file(folder / "model.safetensors")
    del dense["model.norm.weight"]
    save_file(dense, folder / "model.safetensors", metadata={"format": "pt"})
    if forget_checksums:  # as in a folder written before the dense files' sha256 were recorded
        meta = json.loads((folder / "sparse_expansion.json").read_text())
        del meta["sha256"]
        (folder / "sparse_expansion.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("corrupt,message", [
    (_corrupt_format, "unknown experts format 'bitmask-v9'"),
    (lambda f: (f / "sparse_expansion.json").write_text("{"), "is corrupted (not JSON)"),
    (_drop_dense_weight, "model.safetensors is missing, truncated or corrupted"),
    (lambda f: _drop_dense_weight(f, True), "weights missing from the dense part: ['model.norm.weight']"),
    (lambda f: (f / "experts-00001.safetensors").write_bytes((f / "experts-00001.safetensors").read_bytes()[:-9]),
     "missing, truncated or corrupted"),
    (lambda f: (f / "experts-00000.safetensors").unlink(), "missing, truncated or corrupted")])
def test_damaged_expert_folders_are_clear_errors(expert_folder, tmp_path, capsys, corrupt, message):
    folder = tmp_path / "copy"
    shutil.copytree(expert_folder, folder)
    corrupt(folder)
    with pytest.raises(UsageError, match=re.escape(message)):
        load_pruned(folder)
    capsys.readouterr()
    assert cli.main(["eval", str(folder), "--seqlen", "32", "--quiet"]) == 2
    assert message in error_of(capsys)


def test_a_folder_of_txt_files_is_a_source(tiny_folder, small_corpus, tmp_path):
    corpus = tmp_path / "texts"
    corpus.mkdir()
    paragraphs = small_corpus.read_text().split("\n\n")
    (corpus / "a.txt").write_text("\n\n".join(paragraphs[:200]))
    (corpus / "b.txt").write_text("\n\n".join(paragraphs[200:]))
    (corpus / "ignored.md").write_text("not text")
    assert prune(tiny_folder, corpus, tmp_path / "out") == 0
    assert prune(tiny_folder, small_corpus, tmp_path / "same") == 0
    a, b = tensors(tmp_path / "out"), tensors(tmp_path / "same")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same documents in the same order


def test_a_partial_folder_of_a_live_process_is_kept(tmp_path):
    live = tmp_path / f".out.partial-{os.getppid()}"
    dead = tmp_path / ".out.partial-999999999"
    live.mkdir()
    dead.mkdir()
    write_atomically(str(tmp_path / "out"), lambda folder: (folder / "f").write_text("done"))
    assert live.exists() and not dead.exists()


def test_demo_runs_end_to_end_at_a_tiny_size(monkeypatch):
    model, tokenizer = load_model("smollm2")
    small = tiny_model("llama", vocab_size=len(tokenizer))
    monkeypatch.setattr(demo, "load_model", lambda ref: (small, tokenizer))
    rows = demo.run(methods=("magnitude", "sparse-expansion"), nsamples=2, seqlen=32, windows=2, lastword=3,
                    progress=False)
    assert [r["method"] for r in rows] == ["dense", "magnitude", "sparse-expansion (16)"]
    assert rows[1]["sparsity"] == pytest.approx(0.5, abs=0.01) and all(r["tokens"] == 62 for r in rows)
    assert all(r["lastword_examples"] == 3 and 0 <= r["lastword_acc"] <= 1 for r in rows)
    assert "| sparse-expansion (16) | 50.0% |" in demo.table(rows) and "first 3 documents" in demo.table(rows)
    assert {m.format for m in small.modules() if isinstance(m, SparseExpertLinear)} == {"dense"}  # evaluated dense


@pytest.mark.parametrize("method", ["sparsegpt", "sparse-expansion"])
def test_a_bf16_checkpoint_is_pruned_and_saved_in_bf16(tmp_path, small_corpus, smollm2, method):
    _, tokenizer = smollm2
    folder = tmp_path / "bf16"
    tiny_model("llama", vocab_size=len(tokenizer)).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert prune(folder, small_corpus, tmp_path / "out", "--method", method, "--clusters", "2") == 0 \
        if method == "sparse-expansion" else prune(folder, small_corpus, tmp_path / "out") == 0
    saved = tensors(tmp_path / "out")
    assert {t.dtype for k, t in saved.items() if k.endswith("weight") or k.endswith(".values")} == {torch.bfloat16}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("base_config", config)["dtype"] == "bfloat16"  # Sparse Expansion nests the base config
    model, _ = load_model(str(tmp_path / "out"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert prune(folder, small_corpus, tmp_path / "fp32", "--dtype", "float32") == 0
    assert (load_file(tmp_path / "fp32" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].dtype
            == torch.float32)


def test_an_unknown_dtype_is_refused(tiny_folder, small_corpus, tmp_path, capsys):
    assert prune(tiny_folder, small_corpus, tmp_path / "out", "--dtype", "int8") == 2
    assert "--dtype int8: use auto (the checkpoint's dtype), bfloat16, float16, float32" in error_of(capsys)


def test_max_memory_chunks_the_expert_solve_through_the_cli(tiny_folder, small_corpus, tmp_path):
    args = ["--method", "sparse-expansion", "--clusters", "4", "--kmeans-restarts", "1"]
    assert prune(tiny_folder, small_corpus, tmp_path / "whole", *args) == 0
    assert prune(tiny_folder, small_corpus, tmp_path / "chunked", *args, "--max-memory", "400KiB") == 0
    meta = json.loads((tmp_path / "chunked" / "sparse_expansion.json").read_text())
    assert meta["config"]["max_memory"] == 400 * 1024 and {r["solve_chunks"] for r in meta["layers"]} == {2, 4}
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "chunked")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
