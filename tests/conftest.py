import os

# Triton kernels run through the interpreter on CPU; must be set before any @triton.jit import.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct (fp32, CPU). Do not modify it."""
    from sparse_expansion.storage.loading import load_model
    return load_model("smollm2")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, smollm2):
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a transformers folder."""
    from tiny import tiny_model
    _, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A .txt calibration source of 400 embedded Wikipedia documents (tokenizes in a blink)."""
    from sparse_expansion.data import wiki_documents
    path = tmp_path_factory.mktemp("corpus") / "wiki400.txt"
    path.write_text("\n\n".join(wiki_documents()[:400]), encoding="utf-8")
    return path
