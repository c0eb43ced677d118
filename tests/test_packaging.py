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


def test_the_wheel_holds_every_module(tmp_path):
    """A plain `pip install .` (not editable) gets every subpackage: methods, analysis, kernels."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(root),
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    import zipfile
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"sparse_expansion/{p.relative_to(root / 'sparse_expansion').as_posix()}"
               for p in (root / "sparse_expansion").rglob("*.py")}
    sources |= {f"sparse_expansion/kernels/{p.name}" for p in (root / "kernels").glob("*.py")}
    assert sources - names == set()
