"""The package's shape: methods plug in through the registry, imports never go in a circle."""
import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sparse_expansion import cli, models
from sparse_expansion.config import PruneConfig
from sparse_expansion.driver import prune_model
from sparse_expansion.errors import UsageError
from sparse_expansion.methods import METHODS, Method, MethodOptions, register
from tiny import random_tokens, tiny_model

PACKAGE = Path(__file__).resolve().parents[1] / "sparse_expansion"


@dataclass
class LeadingColumnsOptions(MethodOptions):
    offset: int = field(default=0, metadata={"help": "first column zeroed"})

    def validate(self) -> None:
        if self.offset < 0:
            raise UsageError(f"--offset {self.offset}: must not be negative")


class LeadingColumnsMethod(Method):
    """A toy method defined only here: zero `rate` of the columns, starting at --offset."""
    name = "leading-columns"
    Options = LeadingColumnsOptions

    def prune_linear(self, W, stats):
        k = int(W.shape[-1] * self.config.sparsity.rate)
        W_hat = W.clone()
        W_hat[..., self.options.offset:self.options.offset + k] = 0
        return W_hat, {"extras": {"zeroed_columns": k}}


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setitem(METHODS, LeadingColumnsMethod.name, LeadingColumnsMethod)
    assert register(LeadingColumnsMethod) is LeadingColumnsMethod


def test_a_method_defined_outside_the_package_prunes_through_the_driver(toy_method):
    model = tiny_model("llama")
    config = PruneConfig("leading-columns", "0.25", options=LeadingColumnsOptions(offset=2))
    result = prune_model(model, random_tokens(2, 16), config, progress=False)
    assert [r.layer for r in result.layers] == [f"block{b}.mlp.{n}" for b in (0, 1)
                                                for n in ("gate_proj", "up_proj", "down_proj")]
    for r in result.layers:
        assert r.extras == {"zeroed_columns": r.shape[1] // 4} and r.sparsity == 0.25 and r.relative_error > 0
    W = models.linear_weight(model.model.layers[1].mlp.down_proj)
    assert (W[:, 2:2 + 32] == 0).all() and (W[:, :2] != 0).all() and (W[:, 34:] != 0).all()


def test_a_registered_method_gets_its_own_cli_flags(toy_method, tiny_folder, small_corpus, tmp_path):
    out = tmp_path / "out"
    code = cli.main(["prune", str(tiny_folder), "--calib", str(small_corpus), "--nsamples", "2", "--seqlen", "16",
                     "--method", "leading-columns", "--sparsity", "0.5", "--offset", "3", "--quiet",
                     "--output", str(out)])
    assert code == 0
    meta = json.loads((out / "sparse_expansion.json").read_text())
    assert meta["config"]["options"] == {"offset": 3} and meta["layers"][0]["zeroed_columns"] == 32
    assert cli.main(["prune", str(tiny_folder), "--method", "leading-columns", "--offset", "-1",
                     "--output", str(tmp_path / "other")]) == 2


def test_config_accepts_strings_and_checks_itself():
    assert str(PruneConfig("sparsegpt", "2:4").sparsity) == "2:4"
    assert PruneConfig("sparse-expansion").options.clusters == 16
    with pytest.raises(UsageError, match="unknown method 'obc'"):
        PruneConfig("obc")
    with pytest.raises(UsageError, match="takes ExpansionOptions, not SparseGPTOptions"):
        PruneConfig("sparse-expansion", options=PruneConfig("sparsegpt").options)
    with pytest.raises(UsageError, match="batch_size=0: must be at least 1"):
        PruneConfig(batch_size=0)


def _imports(path: Path, module: str) -> set[str]:
    """Modules of the package that `module` (at `path`) imports, at any depth of its code."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target, *(f"{target}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def package_imports() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("sparse_expansion",) + path.relative_to(PACKAGE).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for target in _imports(path, name):
            while target and target not in modules:  # `from .pkg import name`: the module or the package
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                deps.add(target)
        graph[name] = deps
    return graph


def test_the_package_has_no_import_cycle():
    graph, state, cycles = package_imports(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
    assert ("sparse_expansion.models" in graph
            and "sparse_expansion.storage.outputs" not in graph["sparse_expansion.models"])


def test_no_module_is_long_without_saying_why():
    long = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
            if len(p.read_text().splitlines()) > 450 and "Long because" not in p.read_text()[:2000]]
    assert long == []
