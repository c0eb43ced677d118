"""On the embedded SmolLM2-135M and Wikipedia corpus (a few blocks, for speed)."""
import copy
import json
from pathlib import Path

import pytest
import torch

from sparse_expansion import solvers
from sparse_expansion.data import calibration_windows, evaluation_windows, load_split
from sparse_expansion.config import PruneConfig
from sparse_expansion.driver import prune_model
from sparse_expansion.methods import HessianStats
from sparse_expansion.evaluate import perplexity
from sparse_expansion.sparsity import Sparsity


def test_wiki_split_and_reference_protocol_checksums(smollm2):
    _, tok = smollm2
    train, test = load_split("wiki")
    assert (len(train), len(test)) == (9018, 1015)
    assert calibration_windows(tok, "wiki", 32, 512, seed=0).sum().item() == 82074762
    assert evaluation_windows(tok, "wiki", 512, 24).sum().item() == 61908702


def test_quality_calibration_mixture_keeps_the_protocols_first_half(smollm2, tmp_path):
    """benchmarks/quality.py --calib-mix: the first half of the protocol's windows, then windows
    of the other text's train side; without a mixture, the protocol's windows."""
    import sys
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.quality import calibration_mixture
    _, tok = smollm2
    text = tmp_path / "other.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the whale swam past the harbour at dawn." * 20 for i in range(100)))
    wiki = calibration_windows(tok, "wiki", 6, 64, seed=0)
    mixed = calibration_mixture(tok, str(text), 6, 64)
    assert torch.equal(calibration_mixture(tok, None, 6, 64), wiki)
    assert mixed.shape == (6, 64) and torch.equal(mixed[:3], wiki[:3])
    assert torch.equal(mixed[3:], calibration_windows(tok, str(text), 3, 64, seed=0))
    assert "whale" in tok.decode(mixed[4])


def truncated(model, blocks):
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:blocks]
    small.config.num_hidden_layers = blocks
    return small


@pytest.fixture(scope="module")
def captured(smollm2):
    """Hessians of the inputs of block 2's gate/up and down projections on real text."""
    model, tok = smollm2
    block = model.model.layers[2]
    stats = {"gate": HessianStats(576, "cpu"), "down": HessianStats(1536, "cpu")}
    hooks = [block.mlp.gate_proj.register_forward_pre_hook(lambda m, a: stats["gate"].add_batch(a[0])),
             block.mlp.down_proj.register_forward_pre_hook(lambda m, a: stats["down"].add_batch(a[0]))]
    with torch.no_grad():
        truncated(model, 3)(calibration_windows(tok, "wiki", 8, 256, seed=1))
    for h in hooks:
        h.remove()
    return block, stats


@pytest.mark.parametrize("layer,key", [("gate_proj", "gate"), ("down_proj", "down")])
@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_sparsegpt_reconstructs_captured_inputs_best(captured, layer, key, spec):
    block, stats = captured
    W = getattr(block.mlp, layer).weight.detach()[None]
    H, sp = stats[key].H, Sparsity.parse(spec)
    err = {"magnitude": solvers.relative_error(W, solvers.magnitude(W, sp), H)[0],
           "wanda": solvers.relative_error(W, solvers.wanda(W, H, sp), H)[0],
           "sparsegpt": solvers.relative_error(W, solvers.sparsegpt(W, H, sp)[0], H)[0]}
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


def test_sparsegpt_perplexity_below_magnitude_on_four_blocks(smollm2):
    model, tok = smollm2
    calib = calibration_windows(tok, "wiki", 8, 256, seed=0)
    evalw = evaluation_windows(tok, "wiki", 256, 4)
    ppl = {}
    for method in ("magnitude", "sparsegpt"):
        small = truncated(model, 4)
        prune_model(small, calib, PruneConfig(method, Sparsity(0.5)), progress=False)
        ppl[method] = perplexity(small, evalw, progress=False)["perplexity"]
    ppl["dense"] = perplexity(truncated(model, 4), evalw, progress=False)["perplexity"]
    assert ppl["dense"] < ppl["sparsegpt"] < ppl["magnitude"], ppl


@pytest.mark.smoke
def test_sparse_expansion_saved_by_cli_loads_and_generates(tmp_path):
    """The CLI prunes SmolLM2's first two blocks into 4 experts each; the saved folder reloads
    with routed experts and answers a question coherently."""
    import subprocess
    import sys

    from sparse_expansion.methods.expansion.experts import SparseExpertLinear
    from sparse_expansion.storage.loading import load_model

    out = tmp_path / "se"
    cli = [sys.executable, "-m", "sparse_expansion.cli"]  # started in the repository root, as CI does
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([*cli, "prune", "smollm2", "--method", "sparse-expansion",
                          "--clusters", "4", "--kmeans-restarts", "2", "--nsamples", "8", "--seqlen", "128",
                          "--blocks", "0:2", "--output", str(out), "--quiet"], capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stderr
    assert "x the dense model's" in run.stdout
    run = subprocess.run([*cli, "eval", str(out), "--seqlen", "128", "--max-windows", "2", "--json", "--quiet"],
                         capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stderr
    assert 5 < json.loads(run.stdout.splitlines()[-1])["perplexity"] < 100, run.stdout  # ends with a JSON line
    model, tok = load_model(str(out))
    assert isinstance(model.model.layers[1].mlp.down_proj, SparseExpertLinear)
    assert not isinstance(model.model.layers[2].mlp.down_proj, SparseExpertLinear)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    text = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:],
                      skip_special_tokens=True)
    assert "Paris" in text, text


def test_sotu_split_and_spread_windows(smollm2):
    """The held-out corpus (fetched with npm once): one document per address, and windows spread
    evenly over its test stream, first and last included."""
    _, tok = smollm2
    train, test = load_split("sotu")
    assert (len(train), len(test)) == (209, 24)
    every = evaluation_windows(tok, "sotu", 512)
    spread = evaluation_windows(tok, "sotu", 512, 48, spread=True)
    assert spread.shape == (48, 512) and every.shape[0] > 48
    assert torch.equal(spread[0], every[0]) and torch.equal(spread[-1], every[-1])
    assert torch.equal(spread[1], every[round((every.shape[0] - 1) / 47)])
    assert torch.equal(evaluation_windows(tok, "sotu", 512, 48), every[:48])  # without spread: the first ones
    assert spread.sum().item() == 88515227  # the quality benchmark's held-out windows


def test_npm_text_folder_unpacks_only_the_named_text_files_once(monkeypatch, tmp_path):
    """A stand-in `npm pack` (the registry cannot be reached from tests) writes a package whose
    data/ holds two .txt files and a .json; the folder keeps the named .txt only, and a second
    call reads the cache without running npm."""
    import sys
    from sparse_expansion.data import npm_text_folder
    fake = tmp_path / "bin" / "npm"
    fake.parent.mkdir()
    fake.write_text(f"""#!{sys.executable}
import io, sys, tarfile
dest = sys.argv[sys.argv.index("--pack-destination") + 1]
with tarfile.open(dest + "/pkg-1.0.0.tgz", "w:gz") as tar:
    for name, text in (("a.txt", "alpha"), ("b.txt", "beta"), ("c.json", "{{}}")):
        info = tarfile.TarInfo("package/data/" + name)
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text.encode()))
""")
    fake.chmod(0o755)
    monkeypatch.setenv("SPARSE_EXPANSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(fake.parent))
    folder = npm_text_folder("pkg@1.0.0", "pkg", files=("a.txt",))
    assert sorted(f.name for f in folder.iterdir()) == ["a.txt"] and (folder / "a.txt").read_text() == "alpha"
    fake.unlink()  # cached: npm is not needed again
    assert npm_text_folder("pkg@1.0.0", "pkg", files=("a.txt",)) == folder


def test_sotu_without_npm_says_how_to_get_it(monkeypatch, tmp_path):
    from sparse_expansion.data import check_source
    from sparse_expansion.errors import UsageError
    monkeypatch.setenv("SPARSE_EXPANSION_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match="needs npm"):
        check_source("sotu")
