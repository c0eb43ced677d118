"""lm-eval on the loaded model object: the embedded wiki_lastword task, local task files, the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_expansion import cli, commands
from sparse_expansion.data import load_split
from sparse_expansion.downstream import WIKI_TASK, lastword_examples, prepare_tasks, run_tasks, write_wiki_task


def test_lastword_examples_take_the_final_alphabetic_word():
    docs = ["Paris is the capital of France.", "It ends with a number 42.", "One", "A b.", "Short   tail!",
            "Ends on a quote \"word\"."]
    assert lastword_examples(docs) == [{"context": "Paris is the capital of", "target": " France"},
                                       {"context": "Short", "target": " tail"}]


def test_wiki_task_is_written_once_and_holds_every_example(tmp_path):
    folder = write_wiki_task(tmp_path)
    data = (folder / f"{WIKI_TASK}.jsonl").read_text().splitlines()
    expected = lastword_examples(load_split("wiki")[1])
    assert [json.loads(line) for line in data] == expected and len(expected) > 800
    yaml = (folder / f"{WIKI_TASK}.yaml")
    mtime = yaml.stat().st_mtime_ns
    write_wiki_task(tmp_path)
    assert yaml.stat().st_mtime_ns == mtime  # unchanged content is not rewritten
    assert str((folder / f"{WIKI_TASK}.jsonl").resolve()) in yaml.read_text()


def greedy_hits(model, tokenizer, examples) -> int:
    """Our own count of examples whose every target token is the argmax (lm-eval's `acc`)."""
    hits = 0
    for ex in examples:
        context = tokenizer.encode(ex["context"])
        whole = tokenizer.encode(ex["context"] + ex["target"])
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0]
        predicted = logits[len(context) - 1:len(whole) - 1].argmax(-1)
        hits += bool(torch.equal(predicted, torch.tensor(whole[len(context):])))
    return hits


def test_lm_eval_accuracy_matches_a_direct_count(smollm2):
    """lm-eval scores the embedded task on the model object as we would by hand."""
    model, tokenizer = smollm2
    limit = 8
    result = run_tasks(model, tokenizer, [WIKI_TASK], prepare_tasks([WIKI_TASK]), limit=limit, batch_size=4,
                       progress=False)[WIKI_TASK]
    hits = greedy_hits(model, tokenizer, lastword_examples(load_split("wiki")[1])[:limit])
    assert result["examples"] == limit and 0 < hits < limit
    assert result["acc"] == pytest.approx(hits / limit)
    assert result["acc_stderr"] == pytest.approx((hits / limit * (1 - hits / limit) / (limit - 1)) ** 0.5)


def test_cli_eval_runs_local_task_files_and_perplexity(tiny_folder, small_corpus, tmp_path, capsys):
    """A user's own task YAML (--include-path) beside perplexity; one JSON line with both."""
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"q": f"Item {i} is", "a": " red"}) + "\n"
                                                 for i in range(5)))
    (tmp_path / "colours.yaml").write_text(
        "task: my_colours\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(tmp_path / 'data.jsonl'))}\ntest_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    assert cli.main(["eval", str(tiny_folder), "--tasks", f"perplexity,my_colours,{WIKI_TASK}", "--limit", "3",
                     "--include-path", str(tmp_path), "--data", str(small_corpus), "--seqlen", "32",
                     "--max-windows", "2", "--json", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    result = json.loads(out[-1])
    assert result["tokens"] == 62 and result["perplexity"] > 1
    assert result["tasks"]["my_colours"]["examples"] == 3 and result["tasks"][WIKI_TASK]["examples"] == 3
    assert 0 <= result["tasks"]["my_colours"]["acc"] <= 1
    assert any(line.startswith("my_colours: acc ") for line in out)


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "no_such_task"], "unknown lm-eval task(s) no_such_task"),
    (["--tasks", f"{WIKI_TASK}", "--include-path", "/no/such/folder"], "--include-path '/no/such/folder': no such"),
    (["--tasks", f"{WIKI_TASK}", "--limit", "0"], "--limit 0: must be at least 1"),
    (["--tasks", ","], "--tasks is empty"),
])
def test_bad_task_arguments_stop_before_the_model_loads(extra, message, tiny_folder, capsys, monkeypatch):
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["eval", str(tiny_folder), *extra]) == 2
    assert message in capsys.readouterr().err


def test_eval_outside_a_git_repository_prints_no_git_error(tiny_folder, tmp_path):
    """lm-eval's lookup of the working directory's commit is skipped: no "fatal: not a git
    repository" on the terminal of a user who evaluates from an ordinary folder."""
    exe = Path(sys.executable).with_name("sparse-expansion")
    run = subprocess.run([str(exe), "eval", str(tiny_folder), "--tasks", WIKI_TASK, "--limit", "2", "--quiet"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "GIT_CEILING_DIRECTORIES":
                                                                             str(tmp_path.parent)})
    assert run.returncode == 0, run.stderr
    assert "fatal" not in run.stderr and "git" not in run.stderr, run.stderr
