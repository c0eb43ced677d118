"""The installed package: kernels live in sparse_expansion.kernels, never as a top-level module."""
import importlib.util
import subprocess
import sys
from pathlib import Path


def test_kernels_import_from_the_installed_namespace(tmp_path):
    # run from an empty folder so that the source tree is not on sys.path
    code = ("import importlib.util, sparse_expansion.kernels as k, sparse_expansion.kernels.obs as o;"
            "print(k.__file__); print(importlib.util.find_spec('kernels'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    kernels_file, top_level = out.stdout.strip().splitlines()
    assert Path(kernels_file).parent.name == "kernels"
    if top_level != "None":  # another package (Hugging Face `kernels`) may own the name; we must not
        assert "sparse_expansion" not in top_level and Path(kernels_file).parent.as_posix() not in top_level


def test_console_script_is_installed():
    assert Path(sys.executable).with_name("sparse-expansion").exists()
    assert importlib.util.find_spec("sparse_expansion.cli") is not None
