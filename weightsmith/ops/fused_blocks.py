"""The work split shared by ``fused.py`` and its numba kernels (``_kernels.py``), kept apart so
that the kernels need nothing from the module that imports them on first use."""

BLOCK = 1 << 13  # coordinates per parallel work item: fixed, so results do not depend on threads
