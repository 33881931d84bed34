"""`import zidong` makes transformers' Auto classes know the "zidong" model type, without importing the model.

Registering needs the model's classes, and they import torch and transformers (seconds). The command line's data
and config commands need neither, so `import zidong` registers in one of two ways:

- transformers' Auto module (`transformers.models.auto`) is loaded already: register now;
- otherwise: register right after it loads (an import hook on transformers' modules: once the Auto module is in
  and the outermost transformers import under way has finished), which is when a program first reaches
  `AutoConfig`, `AutoModel` or `AutoProcessor`, before it can call them.

Importing the model package itself (`zidong.models.zidong`, as every zidong module that uses the model does)
always registers, at the end of its own import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

TRANSFORMERS_AUTO = "transformers.models.auto"
MODEL_PACKAGE = "zidong.models.zidong"


def register_with_transformers() -> None:
    """Register the Auto classes now if transformers' Auto module is loaded, else as soon as it is."""
    if TRANSFORMERS_AUTO in sys.modules:
        _import_model_package()
    elif not any(isinstance(finder, _AfterTransformersImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImports())


def _import_model_package() -> None:
    # Already in sys.modules means imported or being imported: its own import registers at its end.
    if MODEL_PACKAGE in sys.modules:
        return
    try:
        importlib.import_module(MODEL_PACKAGE)
    except Exception as err:
        warnings.warn(f"zidong could not register its Auto classes with transformers: {err!r}", stacklevel=2)


class _AfterTransformersImports(importlib.abc.MetaPathFinder):
    """Finds transformers' modules as the other finders would and counts the ones executing. When the outermost
    finishes and the Auto module has loaded, it leaves sys.meta_path and imports the model package.

    Not at the end of the Auto module itself: transformers imports it from inside other modules of its own (e.g.
    `transformers.processing_utils`), which would still be half-initialised for the model package's imports."""

    def __init__(self) -> None:
        self.executing = 0

    def find_spec(self, fullname, path, target=None):
        if fullname.partition(".")[0] != "transformers":
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def execute_counted(module) -> None:
            self.executing += 1
            try:
                execute(module)
            finally:
                self.executing -= 1
            if self.executing == 0 and TRANSFORMERS_AUTO in sys.modules and self in sys.meta_path:
                sys.meta_path.remove(self)
                _import_model_package()

        spec.loader.exec_module = execute_counted
        return spec
