"""dfsmerge: data-flow-space merging of language models.

recipe (``recipe.py``) -> model knowledge (``families.py``) -> plan, flat and compact (``plan.py``) -> checkpoints
(``sources.py``, ``gguf.py``) -> output folders (``writer.py``; ``merge.py``, ``flatten.py``) or an in-memory model
(``assemble.py`` over ``modeling_dfs.py``; the old API in ``legacy.py``) -> evaluation (``evaluate.py``) -> search
space (``space.py``) -> search (``evolve.py``) -> command line (``cli.py``). Each module imports only the ones
before it (``pyproject.toml``'s import-linter contract).

Importing the package imports neither torch nor transformers: the public names are imported on first use
(PEP 562), so ``--help`` imports neither and ``plan`` and ``merge`` of safetensors sources import no
transformers. The DFS classes are registered with transformers' Auto classes (so a compact folder loads with
``AutoModelForCausalLM.from_pretrained(folder)``, no remote code) at ``import dfsmerge`` when transformers' Auto
classes are already imported, and otherwise as soon as they are (:class:`_AutoClassRegistration`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import types
import warnings
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "merge": "merge", "plan_recipe": "merge", "flatten": "flatten", "assemble": "assemble", "Sources": "assemble",
    "dfs_execute_from_config": "legacy", "dfs_excute_from_config": "legacy", "data_flow_space_layer_merge": "legacy",
    "evolve": "evolve", "load_search": "space", "make_evaluators": "evaluate", "perplexity": "evaluate",
    "load_model": "evaluate", "Recipe": "recipe", "Hop": "recipe", "Source": "recipe", "Transform": "recipe",
    "RecipeError": "recipe", "load_recipe": "recipe", "parse_recipe": "recipe", "recipe_from_legacy": "recipe",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """The package's module type. Importing a submodule binds it as an attribute of the package; four submodules
    share their name with the function they define (``merge``, ``flatten``, ``assemble``, ``evolve``), and
    ``dfsmerge.merge`` stays the function, as it was when the package imported everything eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

# ----------------------------------------------------------------------------------------- Auto classes

_AUTO_MODULE = "transformers.models.auto.configuration_auto"  # every Auto class imports it


def _register_auto_classes() -> None:
    """Import ``modeling_dfs``, which registers the DFS classes with the Auto classes; a warning, not an error,
    when that fails (the user's own transformers import must not fail because of dfsmerge)."""
    try:
        importlib.import_module(".modeling_dfs", __name__)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the user's import goes on
        warnings.warn(f"dfsmerge could not register its DFS classes with transformers' Auto classes ({exc}); "
                      "compact folders then need trust_remote_code=True", stacklevel=2)


class _AutoClassRegistration(importlib.abc.MetaPathFinder):
    """Registers the DFS classes as soon as transformers' Auto classes are imported, without importing
    transformers itself.

    It cannot happen the moment the Auto module is loaded: transformers' own modules import it halfway through
    their own import (``modeling_utils`` through its quantizers, every ``modeling_*`` through
    ``modeling_layers``), and ``modeling_dfs`` needs those modules whole. So this finder wraps the loader of
    every transformers module to count the transformers imports in progress (per thread), and registers when
    the count is back at zero with the Auto module loaded, i.e. at the end of the outermost transformers import.
    Then it leaves ``sys.meta_path``."""

    def __init__(self) -> None:
        self.local = threading.local()  # .depth: transformers modules being executed; .finding: in find_spec
        self.lock = threading.Lock()
        self.done = False

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name.partition(".")[0] != "transformers" or self.done or getattr(self.local, "finding", False):
            return None
        self.local.finding = True
        try:
            for finder in sys.meta_path:
                spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None:
                    break
        finally:
            self.local.finding = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CountingLoader(spec.loader, self)
        return spec

    def enter(self) -> None:
        self.local.depth = getattr(self.local, "depth", 0) + 1

    def leave(self, ok: bool) -> None:
        self.local.depth -= 1
        if not ok or self.local.depth or self.done or _AUTO_MODULE not in sys.modules:
            return
        with self.lock:
            if self.done:
                return
            self.done = True
        _remove_finder()
        _register_auto_classes()


class _CountingLoader(importlib.abc.Loader):
    """A transformers module's own loader, with its execution counted by the registration finder."""

    def __init__(self, loader: Any, finder: _AutoClassRegistration):
        self.loader, self.finder = loader, finder

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.finder.enter()
        try:
            self.loader.exec_module(module)
        except BaseException:
            self.finder.leave(ok=False)
            raise
        self.finder.leave(ok=True)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        return getattr(self.loader, name)


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AutoClassRegistration)]


if _AUTO_MODULE in sys.modules:
    _register_auto_classes()
else:
    _remove_finder()  # a reloaded package installs one finder, not two
    sys.meta_path.insert(0, _AutoClassRegistration())
