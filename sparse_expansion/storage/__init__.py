"""Everything that reads or writes files, and the transformers integration.

    loading.py     model references (folder, hub id, GGUF, embedded packages) to a model and tokenizer
    packages.py    the embedded model and corpus that ship inside registry packages
    outputs.py     output folders: writing them atomically, spilling finished blocks, loading them back
    packing.py     compressed-tensors formats of the baselines (bitmask, 2:4, packed integers)
    card.py        the model card (README.md) written beside a pruned model
    model_type.py  the `sparse_expansion` model type of folders with routed experts
    hf.py          its registration with transformers' Auto classes
    checkpoint.py  the per-block checkpoint that lets a killed run resume
"""
