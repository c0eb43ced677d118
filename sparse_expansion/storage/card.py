"""The model card (README.md) written into every output folder: what was pruned, how, and how to
load it, from the run's metadata (sparse_expansion.json holds the full record)."""
from __future__ import annotations

import re
from pathlib import Path

from ..version import __version__


def model_card(meta: dict, experts: bool) -> str:
    """Markdown for a folder written by prune or `sparse_expansion.save`; `experts`: it holds
    routed experts (its own model type, loaded after `import sparse_expansion`)."""
    config = meta.get("config") or {}
    arguments = meta.get("arguments") or {}
    method = config.get("method", "unknown method")
    options = config.get("options") or {}
    label = f"{method} ({options['clusters']} experts per linear)" if "clusters" in options else method
    source = arguments.get("model", "a model")
    layers = meta.get("layers") or []
    linears = "all linears" if config.get("targets") == "all" else "FFN linears"
    blocks = config.get("blocks")
    span = (f"block {blocks[0]}" if blocks[1] - blocks[0] == 1 else f"blocks {blocks[0]}-{blocks[1] - 1}") \
        if blocks else ""
    where = f"{linears} of {span}" if span else linears
    lines = [*_front_matter(source, method, experts),
             f"# {source}: {where} pruned with {label} at sparsity {config.get('sparsity', '?')}", "",
             f"Written by sparse-expansion {__version__}.", ""]
    if arguments:
        lines.append(f"- Calibration: {arguments.get('nsamples')} windows of {arguments.get('seqlen')} tokens of "
                     f"`{arguments.get('calib')}`, seed {arguments.get('seed')}.")
    lines.append(f"- Pruned: {len(layers)} linears ({config.get('targets', 'ffn')}); "
                 f"bits: {config.get('bits') or 'none (no quantization)'}.")
    if layers:
        mean = sum(r["relative_error"] for r in layers) / len(layers)
        lines.append(f"- Mean relative reconstruction error ‖WX−ŴX‖²/‖WX‖²: {mean:.4f}.")
    if meta.get("saved_bytes") and meta.get("dense_bytes"):
        lines.append(f"- Weights: {meta['saved_bytes'] / 2**20:.1f} MiB saved, "
                     f"{meta['saved_bytes'] / meta['dense_bytes']:.2f}x the dense model.")
    if meta.get("command_line"):
        lines += ["", "Command:", "", "```", meta["command_line"], "```"]
    load = ["import sparse_expansion  # registers the sparse_expansion model type"] if experts else []
    packed = meta.get("quantization_format") == "pack-quantized"
    imports = "AutoModelForCausalLM, AutoTokenizer" + (", CompressedTensorsConfig" if packed else "")
    options = ", quantization_config=CompressedTensorsConfig(dequantize=True)" if packed else ""
    lines += ["", "## Load", "", "```python", *load,
              f"from transformers import {imports}",
              f'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER"{options})',
              'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")', "```", ""]
    if experts:
        lines += ["Each FFN linear is a set of sparse experts with a router (PCA + nearest centroid); "
                  "without the `sparse-expansion` package transformers refuses the folder rather than "
                  "loading random weights.", ""]
    if meta.get("quantization_format"):
        lines += [f"The quantized linears are compressed-tensors `{meta['quantization_format']}` integer weights "
                  "(per-row asymmetric grid: scale and zero point per output row); pruned weights are stored as "
                  "zeros of the grid." + (" transformers cannot yet build the packed zero points of asymmetric "
                                         "pack-quantized weights, hence `dequantize=True` (dense weights at load "
                                         "time)." if packed else ""), ""]
    lines += ["Perplexity and the embedded last-word task: `sparse-expansion eval THIS_FOLDER --tasks "
              "perplexity,wiki_lastword --seqlen 512`. `sparse_expansion.json` holds the arguments and the "
              "per-layer report.", ""]
    return "\n".join(lines)


def _front_matter(source: str, method: str, experts: bool) -> list[str]:
    """The Hugging Face model card's metadata header (YAML); a hub id becomes its base_model."""
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not Path(source).exists()
    tags = dict.fromkeys(["sparse-expansion", "pruned", method] + (["routed-experts"] if experts else []))
    return ["---", "library_name: transformers", *([f"base_model: {source}"] if hub_id else []), "tags:",
            *(f"- {tag}" for tag in tags), "---", ""]
