import os

# Triton kernels run through the interpreter on CPU; must be set before any @triton.jit import.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct (fp32, CPU). Do not modify it."""
    from sparse_expansion.models import load_model
    return load_model("smollm2")
