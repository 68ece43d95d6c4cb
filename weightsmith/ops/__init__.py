"""Merge operators: one module per method family, registered by name on import.

Every public module of this package is imported here, so a new method is one new file: it
calls ``registry.register`` at import and needs no edit anywhere else. Modules whose name
starts with ``_`` (the numba kernels, loaded on first use) are skipped.
"""

import importlib
import pkgutil

from weightsmith.ops.registry import (  # noqa: F401
    MergeInputs,
    MergeMethod,
    Param,
    get_method,
    methods,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
