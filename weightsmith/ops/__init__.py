"""Merge operators: one module per method family, registered by name on import."""

from weightsmith.ops import (  # noqa: F401
    antidote,
    bang,
    breadcrumbs,
    dare,
    graft,
    iso,
    linear,
    lines,
    model_stock,
    slerp,
    soup,
    task_arithmetic,
    ties,
    transfer,
    tsv,
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
