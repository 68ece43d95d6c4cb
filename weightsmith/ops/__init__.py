"""Merge operators: one module per method family, registered by name on import.

Every public module of this package is imported here, so a new method is one new file: it
calls ``registry.register`` at import and needs no edit anywhere else. Modules whose name
starts with ``_`` (the numba kernels, loaded on first use) are skipped, and so are the
modules in ``KERNEL_MODULES``: they register no method and import numba (~2 s), which
``weightsmith methods`` and a CPU merge need not pay for.
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

KERNEL_MODULES = frozenset({"cuda_kernels"})  # loaded by cuda_fused on first use

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in KERNEL_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")
