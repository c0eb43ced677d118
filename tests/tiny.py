"""Tiny random-weight models of every supported family, built from configs (no download)."""
import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt_neox", "opt", "gpt2")


def tiny_config(family: str, vocab_size: int = 128, layers: int = 2):
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=vocab_size, max_position_embeddings=512,
                  n_embd=64, n_layer=layers, n_head=4, n_positions=512, n_inner=128, ffn_dim=128,
                  word_embed_proj_dim=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw)).eval()
    model.config.use_cache = False
    return model


def random_tokens(n: int, length: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, length), generator=g)
