"""What `import sparse_expansion` sets up while importing neither torch nor transformers (so that
`sparse-expansion --help` answers at once):

* the registration of Sparse Expansion folders with transformers' Auto classes, run when
  transformers loads its Auto modules (at once if it has already): storage/model_type.py registers
  the config class when `transformers.models.auto.configuration_auto` has loaded, storage/hf.py the
  model class when `...modeling_auto` has. Each registers itself at its end, so importing either
  directly registers too.
* the module paths from before the package was grouped by concern
  (`sparse_expansion.experts` is `sparse_expansion.methods.expansion.experts`), imported on use.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# transformers' module -> ours, imported right after it
AFTER = {"transformers.models.auto.configuration_auto": "sparse_expansion.storage.model_type",
         "transformers.models.auto.modeling_auto": "sparse_expansion.storage.hf"}
MOVED = {"experts": "methods.expansion.experts", "router": "methods.expansion.router",
         "expansion": "methods.expansion.stages",
         **{name: f"storage.{name}" for name in ("loading", "outputs", "checkpoint", "card", "model_type", "packing",
                                                 "packages")}}


def _import_after(module_name: str) -> None:
    try:
        importlib.import_module(AFTER[module_name])
    except Exception as e:  # transformers itself stays usable; only our folders will not load through it
        warnings.warn(f"sparse_expansion could not register its model type with transformers ({e!r}); "
                      f"load its folders with sparse_expansion.load", stacklevel=2)


class _Alias(importlib.abc.Loader):
    """Loads an old module path as the module it moved to (one module object under two names)."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.spec = module.__spec__  # the import system overwrites __spec__ with the alias's; restored below
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        package, _, name = fullname.rpartition(".")
        if package == "sparse_expansion" and name in MOVED:
            return importlib.util.spec_from_loader(fullname, _Alias(f"sparse_expansion.{MOVED[name]}"))
        if fullname not in AFTER:
            return None
        for finder in sys.meta_path:  # the spec the other finders give, its loader extended
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _import_after(fullname)
        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Once per process: the finder, and the registrations whose transformers module has loaded."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name in AFTER:
        if name in sys.modules:
            _import_after(name)


def moved_module(name: str):
    """An old module path's module, for attribute access (`sparse_expansion.experts`)."""
    return importlib.import_module(f"sparse_expansion.{MOVED[name]}")
