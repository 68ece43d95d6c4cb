"""Merge operators: one module per method family, registered by name on import."""

from weightsmith.ops import (  # noqa: F401
    breadcrumbs,
    dare,
    linear,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
    wise_ft,
)
from weightsmith.ops.registry import (  # noqa: F401
    MergeInputs,
    MergeMethod,
    Param,
    get_method,
    methods,
    register,
)
