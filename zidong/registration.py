"""`import zidong` makes transformers' Auto classes know the "zidong" model type, without importing the model.

Registering needs the model's classes, and they import torch and transformers (seconds). The command line's data
and config commands need neither, so `import zidong` registers in one of two ways:

- transformers' Auto module (`transformers.models.auto`) is loaded already: register now;
- otherwise: register right after it loads (an import hook on that one module), which is the moment a program
  first reaches `AutoConfig`, `AutoModel` or `AutoProcessor`, before it can call them.

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
    elif not any(isinstance(finder, _AfterAutoImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterAutoImport())


def _import_model_package() -> None:
    # Already in sys.modules means imported or being imported: its own import registers at its end.
    if MODEL_PACKAGE in sys.modules:
        return
    try:
        importlib.import_module(MODEL_PACKAGE)
    except Exception as err:
        warnings.warn(f"zidong could not register its Auto classes with transformers: {err!r}", stacklevel=2)


class _AfterAutoImport(importlib.abc.MetaPathFinder):
    """Finds transformers' Auto module as the other finders would, and imports the model package after it runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRANSFORMERS_AUTO:
            return None
        sys.meta_path.remove(self)  # one use; the lookup below goes to the other finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def execute_then_register(module) -> None:
            execute(module)
            _import_model_package()

        spec.loader.exec_module = execute_then_register
        return spec
