import os

# Triton kernels run through the interpreter on CPU; must be set before any @triton.jit import.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
