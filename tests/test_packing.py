"""Quantized baselines saved as compressed-tensors integer weights and read back by transformers."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import sparse_expansion as se
from sparse_expansion import cli
from sparse_expansion.storage.packing import loading_options
from tiny import random_tokens, tiny_model

FFN = ("gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("method, sparsity, bits, stored", [
    ("sparsegpt", "0.5", 4, "weight_packed"),
    ("magnitude", "2:4", 3, "weight_packed"),
    ("wanda", "0.5", 8, "weight"),
])
def test_quantized_baseline_reloads_through_transformers_with_identical_logits(method, sparsity, bits, stored,
                                                                                tmp_path, smollm2):
    _, tokenizer = smollm2
    model = tiny_model("llama", vocab_size=len(tokenizer))
    se.prune(model, method=method, sparsity=sparsity, bits=bits, calib=random_tokens(4, 32), progress=False)
    out = se.save(model, tmp_path / "q", tokenizer=tokenizer)
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "compressed-tensors" and block["quantization_status"] == "compressed"
    assert block["format"] == ("int-quantized" if bits == 8 else "pack-quantized")
    weights = block["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["strategy"]) == (bits, False, "channel")
    assert len(block["config_groups"]["group_0"]["targets"]) == 6  # the FFN linears of two blocks only

    tensors = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    assert tensors[f"{name}.{stored}"].dtype == (torch.int8 if bits == 8 else torch.int32)
    assert f"{name}.weight_scale" in tensors and "model.layers.1.self_attn.o_proj.weight" in tensors
    w = model.model.layers[1].mlp.down_proj.weight
    assert (w == 0).float().mean() >= 0.5 and torch.unique(w[0]).numel() <= 2 ** bits  # pruned, on the grid

    ids = random_tokens(2, 16)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **loading_options(out)).eval()
    ours, _ = se.load(out)
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(reloaded(ids).logits, expected)
        assert torch.equal(ours(ids).logits, expected)
    assert torch.equal(reloaded.model.layers[1].mlp.down_proj.weight, w)


def test_int8_needs_no_loading_option_and_is_smaller(tmp_path):
    model = tiny_model("llama")
    se.prune(model, method="magnitude", sparsity="0.5", bits=8, calib=random_tokens(2, 16), progress=False)
    dense = se.save(model, tmp_path / "dense", weight_format="dense")
    packed = se.save(model, tmp_path / "packed")
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    assert loading_options(packed) == {}  # int-quantized: plain from_pretrained
    plain = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32)
    ids = random_tokens(1, 8)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
    ffn = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith(FFN))
    saved = (dense / "model.safetensors").stat().st_size - (packed / "model.safetensors").stat().st_size
    assert saved > 0.7 * 3 * ffn  # 4 bytes -> 1 byte per FFN weight (plus one scale and zero per row)


@pytest.mark.parametrize("extra, message", [
    (["--format", "compressed-tensors"], "needs --bits"),
    (["--format", "compressed-tensors", "--bits", "4", "--method", "sparse-expansion"], "own format"),
])
def test_bad_format_arguments(extra, message, tmp_path, capsys):
    assert cli.main(["prune", "smollm2", "--output", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_quantized_prune_writes_compressed_tensors(tiny_folder, small_corpus, tmp_path, capsys):
    out = tmp_path / "q4"
    assert cli.main(["prune", str(tiny_folder), "--method", "sparsegpt", "--bits", "4", "--calib", str(small_corpus),
                     "--nsamples", "4", "--seqlen", "32", "--output", str(out), "--quiet"]) == 0
    assert json.loads((out / "sparse_expansion.json").read_text())["format"] == "compressed-tensors"
    assert "CompressedTensorsConfig(dequantize=True)" in (out / "README.md").read_text()
    assert cli.main(["eval", str(out), "--data", str(small_corpus), "--seqlen", "32", "--max-windows", "2"]) == 0


def test_gpt2_conv1d_layers_stay_dense_under_auto(tmp_path):
    """compressed-tensors quantizes nn.Linear only: GPT-2's Conv1D weights are saved on their grid, dense."""
    model = tiny_model("gpt2")
    se.prune(model, method="magnitude", sparsity="0.5", bits=4, calib=random_tokens(2, 16), progress=False)
    out = se.save(model, tmp_path / "gpt2")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "sparse_expansion.json").read_text())["format"] == "dense"
