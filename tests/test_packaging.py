"""The package as users install and start it, from the repository root as CI does: no folder or
module of the repository may stand in for a dependency of the same name (a top-level `kernels/`
once shadowed Hugging Face's `kernels`, which transformers >= 5.25 imports at model load)."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke
ROOT = Path(__file__).resolve().parents[1]


def from_root(*args, **kwargs):
    """Run `python *args` in the repository root with the root first on sys.path, as `python -m`,
    subprocesses and torchrun workers see it (PYTHONSAFEPATH unset)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


def test_no_module_at_the_root_shadows_an_installed_distribution():
    importable = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    owners = importlib.metadata.packages_distributions()
    clashes = {name: owners[name] for name in importable
               if name in owners and set(owners[name]) != {"sparse-expansion"}}
    assert clashes == {}


def test_kernels_from_the_root_is_not_ours():
    run = from_root("-c", "import importlib.util; s = importlib.util.find_spec('kernels'); print(s and s.origin)",
                    check=True)
    origin = run.stdout.strip()
    if origin != "None":  # Hugging Face's package (installed, perhaps in a venv inside the clone), or nothing
        path = Path(origin).resolve()
        assert path.is_relative_to(Path(sys.prefix).resolve()) or not path.is_relative_to(ROOT), origin


def test_python_m_entry_points_start_from_the_root():
    for module in ("sparse_expansion.demo", "sparse_expansion.cli"):
        run = from_root("-m", module, "--help")
        assert run.returncode == 0 and "usage:" in run.stdout, run.stderr[-2000:]


def test_kernels_import_from_the_installed_namespace(tmp_path):
    # run from an empty folder so that the source tree is not on sys.path
    code = ("import sparse_expansion.kernels as k, sparse_expansion.kernels.obs as o; print(k.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).parent == ROOT / "sparse_expansion" / "kernels"


def test_console_script_is_installed():
    assert Path(sys.executable).with_name("sparse-expansion").exists()
    assert importlib.util.find_spec("sparse_expansion.cli") is not None


def test_the_wheel_builds_from_the_root_and_holds_every_module(tmp_path):
    """`pip wheel .` in the repository root (setuptools' build imports from there), without build
    isolation as offline machines run it; the wheel gets every subpackage: methods, analysis, kernels."""
    run = from_root("-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".", "-w", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"sparse_expansion/{p.relative_to(ROOT / 'sparse_expansion').as_posix()}"
               for p in (ROOT / "sparse_expansion").rglob("*.py")}
    assert any(n.startswith("sparse_expansion/kernels/") for n in sources)
    assert sources - names == set()


def _python(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_importing_the_package_and_the_cli_stays_cheap():
    """`import sparse_expansion` loads neither torch nor transformers, the CLI's argument parser
    no transformers: `sparse-expansion --help` needs neither's start-up time."""
    out = _python("import sys, sparse_expansion; print('torch' in sys.modules, 'transformers' in sys.modules)")
    assert out.split() == ["False", "False"]
    out = _python("import sys, sparse_expansion.cli as c; c._parser(); print('transformers' in sys.modules)")
    assert out.split() == ["False"]


REGISTERED = """
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from sparse_expansion.storage.model_type import SparseExpansionConfig
assert "sparse_expansion" in CONFIG_MAPPING
assert MODEL_FOR_CAUSAL_LM_MAPPING[SparseExpansionConfig].__name__ == "SparseExpansionForCausalLM"
"""


@pytest.mark.parametrize("first", [
    "import sparse_expansion",  # before transformers: registered when its Auto modules load
    "import transformers; transformers.AutoModelForCausalLM; import sparse_expansion",  # after them
    "import sparse_expansion; from transformers import pipeline",  # through another of its modules
    "import sparse_expansion.storage.hf",  # our module directly
])
def test_the_auto_classes_know_sparse_expansion_whatever_the_import_order(first):
    _python(f"{first}\n{REGISTERED}")


def test_a_config_alone_is_registered_before_the_modeling_code_loads():
    _python("import sys, sparse_expansion\nfrom transformers import AutoConfig\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "assert 'sparse_expansion' in CONFIG_MAPPING and 'transformers.modeling_utils' not in sys.modules")


def test_old_module_paths_are_the_moved_modules():
    _python("import sys\nfrom sparse_expansion.experts import SparseExpertLinear\n"
            "import sparse_expansion.outputs as o, sparse_expansion as se\n"
            "assert se.experts.SparseExpertLinear is SparseExpertLinear and se.prune and se.PruneConfig\n"
            "assert o is sys.modules['sparse_expansion.storage.outputs']\n"
            "assert o.__spec__.name == 'sparse_expansion.storage.outputs'")
