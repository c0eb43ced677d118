"""Downstream evaluation through lm-eval on a loaded model object, and the embedded offline task.

`wiki_lastword` (LAMBADA-style): for each document of the embedded Wikipedia test split whose
last word is alphabetic, predict that word (without its final punctuation) from the text before
it; `acc` counts the documents whose every target token is the greedy choice. It is written as an
ordinary lm-eval task (a YAML file and its JSON-lines data) under the cache folder, so that lm-eval
itself scores it, offline, exactly as it scores any other task.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import re
from pathlib import Path

from .data import WIKI_PACKAGE, load_split
from .errors import UsageError
from .storage.packages import cache_dir, require

WIKI_TASK = "wiki_lastword"
PERPLEXITY = "perplexity"  # not an lm-eval task: the CLI's held-out perplexity
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{2,})[.!?]?$", re.S)


def lastword_examples(documents: list[str]) -> list[dict[str, str]]:
    """{'context', 'target'} of every document ending in an alphabetic word (target ' word')."""
    examples = []
    for doc in documents:
        match = _LAST_WORD.match(doc.strip())
        if match:
            examples.append({"context": match.group(1), "target": " " + match.group(2)})
    return examples


def _task_yaml(data: Path) -> str:
    return "\n".join([
        f"task: {WIKI_TASK}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        "test_split: test",
        "output_type: loglikelihood",
        'doc_to_text: "{{context}}"',
        'doc_to_target: "{{target}}"',
        'target_delimiter: ""',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        ""])


def write_wiki_task(folder: Path | None = None) -> Path:
    """Write (or refresh) the embedded task's YAML and data; returns the folder for lm-eval's include path."""
    folder = folder or cache_dir() / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    _, test = load_split("wiki")
    data = folder / f"{WIKI_TASK}.jsonl"
    lines = "".join(json.dumps(e) + "\n" for e in lastword_examples(test))
    for path, text in ((data, lines), (folder / f"{WIKI_TASK}.yaml", _task_yaml(data.resolve()))):
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return folder


def prepare_tasks(tasks: list[str], include_path: str | None = None):
    """lm-eval's TaskManager with the embedded task and `include_path`'s YAML files, after checking
    that every name in `tasks` is a task or group it knows (a UsageError otherwise)."""
    require("lm_eval", "lm-eval", "--tasks")
    if include_path is not None and not Path(include_path).is_dir():
        raise UsageError(f"--include-path {include_path!r}: no such folder")
    from lm_eval.tasks import TaskManager
    embedded = WIKI_TASK in tasks or importlib.util.find_spec(WIKI_PACKAGE) is not None  # hub tasks need no corpus
    paths = ([str(write_wiki_task())] if embedded else []) + ([include_path] if include_path else [])
    with _lm_eval_logging(logging.ERROR):
        manager = TaskManager(include_path=paths, include_defaults=False)  # ours alone: indexed in a blink
        if any(t not in manager.all_tasks for t in tasks):  # lm-eval's own tasks too (~10 s to index)
            manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-eval task(s) {', '.join(unknown)}: see `lm-eval ls tasks`; the embedded "
                         f"offline task is {WIKI_TASK}; local task files go in --include-path")
    with _dataset_errors(), _lm_eval_logging(logging.ERROR):
        manager.load(tasks)  # fetch the datasets now, before any model is loaded (cached for the run)
    return manager


@contextlib.contextmanager
def _dataset_errors():
    try:
        yield
    except (ConnectionError, OSError) as e:
        raise UsageError(f"lm-eval could not read a task's dataset ({e.__class__.__name__}: {str(e)[:160]}); "
                         f"offline, use {WIKI_TASK} or local task files (--include-path)") from None


@contextlib.contextmanager
def _lm_eval_logging(level: int):
    logger = logging.getLogger("lm_eval")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def _no_git_lookup():
    """lm-eval records the git commit of the working directory by running `git describe`, whose
    "fatal: not a git repository" reaches the terminal outside a repository; the commit of the
    caller's directory says nothing about the evaluated model, so the lookup is skipped."""
    from lm_eval import evaluator
    if not hasattr(evaluator, "get_git_commit_hash"):  # a release that no longer looks it up
        yield
        return
    lookup = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = lookup


def run_tasks(model, tokenizer, tasks: list[str], manager, limit: int | None = None, batch_size: int = 8,
              progress: bool = True) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's `simple_evaluate` on the model object (stderrs as
    'metric_stderr'). `limit`: the first N documents of each task."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    with _lm_eval_logging(logging.ERROR):  # its notes on a passed-in model object
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    bars = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with _dataset_errors(), bars, _lm_eval_logging(logging.WARNING if progress else logging.ERROR), _no_git_lookup():
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      bootstrap_iters=1000, log_samples=False)
    results = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt and isinstance(value, (int, float)):
                row[metric if filt == "none" else f"{metric},{filt}"] = float(value)
        row["examples"] = int(out["n-samples"].get(task, {}).get("effective", 0)) if "n-samples" in out else None
        results[task] = row
    return results
