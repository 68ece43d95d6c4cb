"""Merge operators: one module per method family, registered by name on import."""

from weightsmith.ops import linear, task_arithmetic, wise_ft  # noqa: F401
from weightsmith.ops.registry import (  # noqa: F401
    MergeInputs,
    MergeMethod,
    Param,
    get_method,
    methods,
    register,
)
