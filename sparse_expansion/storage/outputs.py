"""Writing and reading pruned models.

A pruned model is a transformers folder (safetensors) written atomically (`PartialOutput`), with
a model card (card.py) and the sha256 of every weight file in `sparse_expansion.json`. Models
with routed experts get their own model type in config.json (model_type.py) and expert files:
every expert weight compressed (kept values + bitmask), biases, and the routers (PCA
mean/basis, centroids): one `experts-NNNNN.safetensors` per block when prune spills each
finished block there (`spill_block`), or one `experts.safetensors` for a model whose experts are
in memory. The dense part sits in the usual transformers files. `load_pruned` rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .card import model_card
from ..errors import UsageError, option, setting
from ..methods.expansion.experts import SparseExpertLinear, pack_experts, unpack_experts
from ..faults import fault_point
from .lazy import LazyExperts, install_lazy_experts
from .model_type import base_config, wrap_config
from .packing import FORMATS, add_quantization_config, compressed_state, quantized_linears

METADATA = "sparse_expansion.json"
EXPERTS_FILE = "experts.safetensors"
EXPERTS_FORMAT = "bitmask-v1"


def check_output(output: str, overwrite: bool = False) -> None:
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{setting('output', output)} is a file; give a folder path "
                         f"({setting('overwrite')} replaces folders only)")
    if path.exists() and not overwrite:
        raise UsageError(f"{setting('output', output)} already exists; choose another folder or pass "
                         f"{setting('overwrite')}")
    if not path.parent.resolve().exists():
        raise UsageError(f"{setting('output', output)}: parent folder {str(path.parent)!r} does not exist")
    try:  # a real write, not os.access: root passes access checks on read-only mounts such as /proc
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=path.parent.resolve()))
    except OSError as e:
        raise UsageError(f"{setting('output', output)}: parent folder {str(path.parent)!r} is not writable "
                         f"({e.strerror})") from None


class PartialOutput:
    """The folder `.NAME.partial-PID` beside --output that a run fills (spilled experts as blocks
    finish, then the rest), renamed onto --output in one step by `commit`; `discard` removes it."""

    def __init__(self, output: str, overwrite: bool = False):
        check_output(output, overwrite)
        self.final = Path(output)
        self.folder = self.final.with_name(f".{self.final.name}.partial-{os.getpid()}")
        self._remove_stale()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)

    def _remove_stale(self) -> None:
        """Remove the partial folders of this output left by runs that were killed while writing."""
        for stale in self.final.parent.glob(f".{self.final.name}.partial-*"):
            if not _alive(stale.name.rsplit("-", 1)[1]):
                shutil.rmtree(stale, ignore_errors=True)

    def commit(self) -> Path:
        fault_point("save")
        for f in self.folder.iterdir():
            if f.is_file():
                readable(f)
        final = self.final
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            self.folder.rename(final)
            shutil.rmtree(old)
        else:
            self.folder.rename(final)
        self._remove_stale()
        return final

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def write_atomically(output: str, write, overwrite: bool = False, partial: PartialOutput | None = None) -> Path:
    """Call write(folder) on a partial folder (a new one unless given), then move it to `output`
    in one rename; on any failure nothing is left at `output` and the partial folder is removed."""
    partial = partial or PartialOutput(output, overwrite)
    try:
        write(partial.folder)
        return partial.commit()
    finally:
        partial.discard()


def readable(path: Path) -> None:
    """Give a written file the mode the user's umask allows (safetensors writes its files 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix == ".safetensors")


def expert_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseExpertLinear)}


class SpilledExperts(nn.Module):
    """Stands in for a block's `SparseExpertLinear` once its experts are written to the output's
    partial folder and released from memory (prune's bounded host memory); it cannot run."""

    def __init__(self, name: str, module: SparseExpertLinear, entry: dict | None):
        super().__init__()
        self.name, self.entry, self.format = name, entry, module.format
        self.in_features, self.out_features = module.in_features, module.out_features
        self.weight_dtype, self.element_size = module.weight_dtype, module.weight_dtype.itemsize

    def forward(self, x):
        raise RuntimeError(f"the experts of {self.name} were written to the output and released from memory; "
                           f"load the saved model with sparse_expansion.load")


def spill_block(model: nn.Module, prefix: str, folder: Path | None, name: str) -> None:
    """Write the experts of the block at `prefix` (e.g. 'model.layers.3') to folder/`name` (no
    write when folder is None: another rank writes) and swap them for `SpilledExperts`."""
    block = model.get_submodule(prefix)
    experts = expert_layers(block)
    if not experts:
        return
    entry = None
    if folder is not None:
        tensors, layout = pack_experts({f"{prefix}.{n}": m for n, m in experts.items()})
        save_file(tensors, folder / name)
        entry = {"file": name, "sha256": _sha256(folder / name), "layers": layout}
    for n, m in experts.items():
        block.set_submodule(n, SpilledExperts(f"{prefix}.{n}", m, entry))


def read_spilled_lazily(model: nn.Module, folder: Path) -> int:
    """Swap the `SpilledExperts` of a model saved to `folder` for `LazyExperts` reading the saved
    files, so that the model runs again (its experts read while they run); returns how many."""
    spilled = {name: m for name, m in model.named_modules() if isinstance(m, SpilledExperts)}
    if not spilled:  # a baseline's output: nothing was spilled
        return 0
    runtime_format = read_metadata(folder)["experts"].get("runtime_format", "bitmask")
    for name, m in spilled.items():
        like = torch.empty(0, dtype=m.weight_dtype)
        model.set_submodule(name, LazyExperts(Path(folder) / m.entry["file"], name, m.entry["layers"][name],
                                              runtime_format, like))
    return len(spilled)


def save_pruned_model(model, tokenizer, output: str, metadata: dict, overwrite: bool = False,
                      partial: PartialOutput | None = None, weight_format: str = "auto") -> Path:
    """Save model + tokenizer + metadata (arguments, per-layer report) as a transformers folder.
    Experts still in memory go to experts.safetensors; spilled ones are already in `partial`.
    weight_format: 'dense', or 'compressed-tensors' for the quantized linears (packing.py); 'auto':
    compressed-tensors when the model has quantized nn.Linear layers, dense otherwise."""
    experts = expert_layers(model)
    spilled = {name: m for name, m in model.named_modules() if isinstance(m, SpilledExperts)}
    lazy = [name for name, m in model.named_modules() if isinstance(m, LazyExperts)]
    if lazy:
        raise UsageError(f"{lazy[0]}: the model's experts were loaded lazily (they stay in their files); "
                         f"load it with {setting('lazy', False)} to save it again")
    quantized = bool(quantized_linears(model))
    if weight_format not in FORMATS:
        raise UsageError(f"weight format {weight_format!r}: use one of {', '.join(FORMATS)}")
    if weight_format == "auto":
        weight_format = "compressed-tensors" if quantized else "dense"
    if weight_format == "compressed-tensors" and not quantized:
        raise UsageError(f"compressed-tensors: the model has no quantized linears (prune with {option('bits')})")

    def write(folder: Path) -> None:
        meta = dict(metadata)
        prefixes = tuple(f"{name}." for name in [*experts, *spilled])
        calibrating = model.config.use_cache
        model.config.use_cache = type(model.config)().use_cache  # as the architecture has it, not calibration's
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
        if weight_format == "compressed-tensors":
            state, quantization = compressed_state(model, state)
        try:
            model.save_pretrained(folder, state_dict=state)
        finally:
            model.config.use_cache = calibrating
        if weight_format == "compressed-tensors":
            add_quantization_config(folder, quantization)
            meta["quantization_format"] = quantization["format"]
        meta["format"] = weight_format
        files = list({id(m.entry): m.entry for m in spilled.values()}.values())
        if experts:
            tensors, layers = pack_experts(experts)
            save_file(tensors, folder / EXPERTS_FILE)
            files.append({"file": EXPERTS_FILE, "sha256": _sha256(folder / EXPERTS_FILE), "layers": layers})
        if files:
            wrap_config(folder)  # its own model type: plain transformers refuses it (see hf.py)
            formats = {m.format for m in [*experts.values(), *spilled.values()]}
            meta["experts"] = {"format": EXPERTS_FORMAT, "files": files,
                               "runtime_format": "2:4" if formats == {"2:4"} else "bitmask"}
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        dense_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                          if not n.startswith(prefixes))
        dense_bytes += sum(m.in_features * m.out_features * m.weight_dtype.itemsize for m in experts.values())
        dense_bytes += sum(m.in_features * m.out_features * m.element_size for m in spilled.values())
        meta["saved_bytes"], meta["dense_bytes"] = folder_bytes(folder), dense_bytes
        hashed = {entry["file"] for entry in files}  # the expert files carry theirs
        meta["sha256"] = {f.name: _sha256(f) for f in sorted(folder.glob("*.safetensors")) if f.name not in hashed}
        (folder / METADATA).write_text(json.dumps(meta, indent=1))
        (folder / "README.md").write_text(model_card(meta, experts=bool(files)))
    return write_atomically(output, write, overwrite, partial)


def read_metadata(folder: str | Path) -> dict | None:
    path = Path(folder) / METADATA
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UsageError(f"{path} is corrupted (not JSON); re-run prune") from None


def check_files(folder: str | Path) -> None:
    """Refuse a folder written by `prune` whose dense weight files (model*.safetensors) differ
    from the sha256 recorded in its metadata (expert files are checked as they are read)."""
    folder = Path(folder)
    for name, digest in ((read_metadata(folder) or {}).get("sha256") or {}).items():
        path = folder / name
        if not path.exists() or _sha256(path) != digest:
            raise UsageError(f"{path} is missing, truncated or corrupted (sha256 differs from {METADATA}); "
                             f"re-run prune")


def is_expert_folder(folder: str | Path) -> bool:
    meta = read_metadata(folder) if Path(folder).is_dir() else None
    return bool(meta and "experts" in meta)


def load_pruned(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) of a folder written by `prune`, with its routed experts rebuilt."""
    return load_pruned_model(folder, device, dtype), AutoTokenizer.from_pretrained(folder)


def load_pruned_model(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                      attn_implementation: str | None = None, lazy: bool = False) -> nn.Module:
    """The model of a folder written by `prune`, with its routed experts rebuilt (no tokenizer).
    `attn_implementation` ('eager', 'sdpa', ...) is passed to transformers; None keeps its default.
    The expert files are read one at a time, each released once its modules are built; `lazy`:
    they stay in their files and are read each time their linear runs (lazy.py)."""
    folder = Path(folder)
    meta = read_metadata(folder)
    if meta is None or "experts" not in meta:
        raise UsageError(f"{folder} holds no routed experts ({METADATA} without an 'experts' entry)")
    info = meta["experts"]
    if info.get("format") != EXPERTS_FORMAT:
        raise UsageError(f"{folder}: unknown experts format {info.get('format')!r}; expected {EXPERTS_FORMAT}")
    check_files(folder)
    files = info.get("files") or [info]  # one experts.safetensors (earlier outputs) or one file per block
    for entry in files:  # every file checked before the dense part loads
        path = folder / entry["file"]
        if not path.exists() or _sha256(path) != entry["sha256"]:
            raise UsageError(f"{path} is missing, truncated or corrupted (sha256 differs from {METADATA}); "
                             f"re-run prune")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the expert linears are expected to be missing from the dense part
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(folder, config=base_config(folder), dtype=dtype or "auto",
                                                              output_loading_info=True,
                                                              **({"attn_implementation": attn_implementation}
                                                                 if attn_implementation else {}))
    except (OSError, SafetensorError, ValueError) as e:
        raise UsageError(f"{folder}: the dense part cannot be loaded ({e}); re-run prune") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    prefixes = tuple(f"{name}." for entry in files for name in entry["layers"])
    unexpected = [k for k in loading["missing_keys"] if not k.startswith(prefixes)]
    if unexpected:
        raise UsageError(f"{folder}: weights missing from the dense part: {unexpected[:3]}; re-run prune")
    runtime_format = info.get("runtime_format", "bitmask")
    if lazy:
        install_lazy_experts(model, folder, files, runtime_format)
    for entry in files if not lazy else []:
        path = folder / entry["file"]
        try:
            tensors = load_file(path)
        except SafetensorError as e:
            raise UsageError(f"{path} cannot be read ({e}); re-run prune") from None
        if dtype is not None:  # the experts' weights and biases in the asked dtype (routers stay fp32)
            tensors = {k: v.to(dtype) if k.endswith((".weight.values", ".bias")) else v for k, v in tensors.items()}
        unpack_experts(model, tensors, entry["layers"], runtime_format)
        del tensors
    model.to(device).eval()
    model.config.use_cache = False
    return model
