"""Checkpoints of a pruning run, so that a killed run resumes after its last finished block.

A checkpoint folder holds:
  checkpoint.json                  the run's identity (every argument that changes the result),
                                   the next block to prune, the reports so far and the name of
                                   the activations file; rewritten by rename after every block,
                                   so it always describes complete files
  block-NNNN.safetensors           the pruned linears of block NNNN (compressed: experts and routers, or
                                   the pruned weights as values + bitmask, bit-exact)
  activations-NNNN.safetensors     the calibration activations after block NNNN, i.e. the next
                                   block's inputs, in the model's dtype (one file is kept)

Resuming restores the pruned blocks and the activations exactly, so on the same device a resumed
run gives the same model as an uninterrupted one, bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..version import __version__
from ..config import PruneConfig
from ..errors import UsageError
from ..methods.expansion.experts import SparseExpertLinear, compress, decompress, pack_experts, unpack_experts
from ..faults import fault_point
from ..models import decoder_blocks
from .outputs import readable
from .packing import GRID, remember_grid
from ..reports import PruneResult

FORMAT = "sparse-expansion-checkpoint-v3"
STATE = "checkpoint.json"


def _write_file(path: Path, write) -> None:
    """write(tmp_path), flush it to disk, then rename it over `path` (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    readable(tmp)
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _write_file(path, lambda tmp: save_file(tensors, tmp,
                                            metadata={k: json.dumps(v) for k, v in (metadata or {}).items()}))


def _ours(name: str) -> bool:
    return re.fullmatch(r"\.?(block|activations)-\d+\.safetensors(\.tmp)?"
                        r"|\.?checkpoint\.json(\.tmp)?", name) is not None


def run_identity(model_ref: str, config: PruneConfig, calibration: torch.Tensor, device, dtype: torch.dtype
                 ) -> dict:
    """Everything that changes a run's result: the package version, the model reference and its
    dtype, the config, the device type and a hash of the calibration token ids (source, count,
    length, seed)."""
    ids = calibration.detach().cpu().to(torch.int64).contiguous()
    settings = config.as_dict()
    options = settings.pop("options")
    del settings["max_memory"]  # chunking the solve does not change the result
    return {"version": __version__, "model": model_ref, "dtype": str(dtype).removeprefix("torch."),
            "device": torch.device(device).type,
            "calibration_shape": list(ids.shape),
            "calibration_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
            **settings, **{f"options.{key}": value for key, value in options.items()}}


def _as_flags(key: str, value) -> str:
    """An identity entry as the command line writes it (calibration_shape: --nsamples and --seqlen)."""
    if key == "calibration_shape" and isinstance(value, list) and len(value) == 2:
        return f"--nsamples {value[0]} --seqlen {value[1]}"
    return f"{key}={value!r}"


class Checkpoint:
    """The checkpoint folder of one run of the model `model_ref`. Opening it checks the folder;
    `bind` (called by the driver) checks that an existing checkpoint was made with the same
    identity (a UsageError names the first key that differs)."""

    def __init__(self, folder: str | Path, model_ref: str):
        self.folder = Path(folder)
        self.model_ref = model_ref
        self.identity: dict | None = None
        self.state = self._read()

    def bind(self, config: PruneConfig, calibration: torch.Tensor, device, dtype: torch.dtype) -> None:
        """Fix this run's identity; refuse a checkpoint that another run wrote."""
        self.identity = json.loads(json.dumps(run_identity(self.model_ref, config, calibration, device, dtype)))
        if self.state is None:
            return
        flag, old = f"--checkpoint-dir {str(self.folder)!r}", self.state["identity"]
        # the calibration hash last: a changed --nsamples, --seqlen or --seed is named by its own key
        for key in sorted(set(old) | set(self.identity), key=lambda k: (k == "calibration_sha256", k)):
            if old.get(key) == self.identity.get(key):
                continue
            if key == "calibration_sha256":
                raise UsageError(f"{flag} holds a run calibrated on other tokens (--calib, --encoding or the text "
                                 f"changed); repeat the first command's arguments to resume, or give another "
                                 f"--checkpoint-dir")
            raise UsageError(f"{flag} holds a run with {_as_flags(key, old.get(key))} but this command has "
                             f"{_as_flags(key, self.identity.get(key))}; repeat the first command's arguments to "
                             f"resume, or give another --checkpoint-dir")

    def _read(self) -> dict | None:
        flag = f"--checkpoint-dir {str(self.folder)!r}"
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"{flag} is a file; give a folder")
        path = self.folder / STATE
        if not path.exists():  # a new folder, or a run killed before its first commit
            if self.folder.exists() and any(not _ours(f.name) for f in self.folder.iterdir()):
                raise UsageError(f"{flag} is not empty and holds no checkpoint; give an empty or new folder")
            return None
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UsageError(f"{path} is corrupted (not JSON); delete the folder to start over") from None
        if state.get("format") != FORMAT:
            raise UsageError(f"{path}: unknown checkpoint format {state.get('format')!r}; expected {FORMAT}")
        return state

    @property
    def next_block(self) -> int:
        return 0 if self.state is None else self.state["next_block"]

    def describe(self, end: int | None = None) -> str:
        """One line on where the run stands: new, or resuming (blocks done, sizes) with the time
        left until block `end`, estimated from the pruned blocks' measured rate."""
        if self.state is None:
            return f"checkpoints go to {self.folder} after every block"
        line = (f"resuming from {self.folder}: blocks 0-{self.next_block - 1} done; "
                f"{self.disk_bytes() / 2**20:.1f} MiB on disk, of which "
                f"{self.state['activations']['bytes'] / 2**20:.1f} MiB of activations")
        seconds = [b["seconds"] for b in self.state["result"]["blocks"] if b["pruned"]]
        if end is not None and end > self.next_block and seconds:
            rate = sum(seconds) / len(seconds)
            line += (f"; at {rate:.1f} s a block so far, about {(end - self.next_block) * rate / 60:.1f} min "
                     f"left for blocks {self.next_block}-{end - 1}")
        return line

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.iterdir()) if self.folder.exists() else 0

    def restore(self, model: nn.Module, cached: list, loaded: Callable[[int], None] | None = None,
                ids: range | None = None, batches: int | None = None) -> tuple[int, list, PruneResult]:
        """(first block, cached inputs, result so far) to continue from: the saved blocks are loaded
        into `model` (`loaded(b)` is called after each), the saved activations replace those of
        `cached`: batches `ids` (default: all) of the run's `batches` (default: len(cached))."""
        ids = range(len(cached)) if ids is None else ids
        batches = len(cached) if batches is None else batches
        if self.state is None:
            return 0, cached, PruneResult()
        blocks = decoder_blocks(model)
        for b, name in self.state["block_files"].items():
            self._load_block(blocks[int(b)], self.folder / name)
            if loaded is not None:
                loaded(int(b))
        saved = load_file(self.folder / self.state["activations"]["file"])
        if len(saved) != batches:
            raise UsageError(f"{self.folder}: the checkpoint holds {len(saved)} activation batches, the run has "
                             f"{batches}; delete the folder to start over")
        cached = [(saved[f"batch{i}"].to(hidden.device), args, kwargs)
                  for i, (hidden, args, kwargs) in zip(ids, cached)]
        return self.next_block, cached, PruneResult.from_dict(self.state["result"])

    @staticmethod
    def _load_block(block: nn.Module, path: Path) -> None:
        with safe_open(path, "pt") as f:  # one read: the layout and the tensors
            meta = {k: json.loads(v) for k, v in f.metadata().items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        unpack_experts(block, tensors, meta["experts"])
        for name in meta["linears"]:
            module = block.get_submodule(name)
            prefix = f"{name}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            weight = {k[len("weight."):]: state.pop(k) for k in list(state) if k.startswith("weight.")}
            grid = {k[len("grid."):]: state.pop(k) for k in list(state) if k.startswith("grid.")}
            module.load_state_dict({**state, "weight": decompress(weight)})
            if grid:
                remember_grid(module, grid["scale"], grid["zero"], meta["bits"][name])

    def save(self, b: int, block: nn.Module, names: list[str], hidden: list[torch.Tensor], result: PruneResult
             ) -> None:
        """Save block `b` (its pruned linears `names`) and the activations after it (every batch's
        hidden states, in order), then commit."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state = dict(self.state or {"format": FORMAT, "identity": self.identity, "block_files": {}})
        state["block_files"] = dict(state["block_files"])
        if names:
            modules = {n: block.get_submodule(n) for n in names}
            experts = {n: m for n, m in modules.items() if isinstance(m, SparseExpertLinear)}
            tensors, layout = pack_experts(experts)
            linears, bits = [n for n in names if n not in experts], {}
            for n in linears:  # weights compressed bit-exactly (values + bitmask), biases as they are
                for k, v in modules[n].state_dict().items():
                    if k == "weight":
                        tensors.update({f"{n}.weight.{p}": t for p, t in compress(v, exact=True).items()})
                    else:
                        tensors[f"{n}.{k}"] = v
                if hasattr(modules[n], GRID):  # a quantized linear's grid, for the saved integers
                    tensors[f"{n}.grid.scale"], tensors[f"{n}.grid.zero"], bits[n] = getattr(modules[n], GRID)
            name = f"block-{b:04d}.safetensors"
            _save_tensors(self.folder / name, tensors, {"experts": layout, "linears": linears, "bits": bits})
            state["block_files"][str(b)] = name
        activations = f"activations-{b:04d}.safetensors"
        _save_tensors(self.folder / activations, {f"batch{i}": h for i, h in enumerate(hidden)})
        fault_point(f"checkpoint:{b}")
        state.update(next_block=b + 1, result=result.to_dict(),
                     activations={"file": activations, "bytes": sum(h.numel() * h.element_size() for h in hidden)})
        _write_file(self.folder / STATE, lambda tmp: tmp.write_text(json.dumps(state)))
        self.state = state
        fault_point(f"block:{b}")
        for old in self.folder.glob("activations-*.safetensors"):
            if old.name != activations:
                old.unlink()
