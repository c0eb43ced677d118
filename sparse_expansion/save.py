"""Writing a pruned model: a transformers folder (safetensors) written atomically, plus metadata."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import UsageError

METADATA = "sparse_expansion.json"


def check_output(output: str, overwrite: bool = False) -> None:
    path = Path(output)
    if path.exists() and not overwrite:
        raise UsageError(f"--output {output!r} already exists; choose another folder or pass --overwrite")
    if not path.parent.resolve().exists():
        raise UsageError(f"--output {output!r}: parent folder {str(path.parent)!r} does not exist")


def write_atomically(output: str, write, overwrite: bool = False) -> Path:
    """Call write(tmp_folder), then move the finished folder to `output` in one rename."""
    final = Path(output)
    check_output(output, overwrite)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_pruned_model(model, tokenizer, output: str, metadata: dict, overwrite: bool = False) -> Path:
    """Save model + tokenizer + metadata (arguments, per-layer report) as a transformers folder."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / METADATA).write_text(json.dumps(metadata, indent=1))
    return write_atomically(output, write, overwrite)
