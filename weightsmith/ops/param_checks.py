"""Plan-time checks of a method's parameters over every tensor (``prepare`` hooks call them), so
bad values fail before any work starts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from weightsmith.errors import RecipeError
from weightsmith.ops.registry import TensorSpec


def check_density(specs: Sequence[TensorSpec], method: str) -> None:
    for spec in specs:
        for i, d in enumerate(spec.params["density"]):
            if not (0 < d <= 1) or math.isnan(d):
                raise RecipeError(
                    f"{method}: density of {spec.model_label(i)} for tensor {spec.name!r} is {d}; it is the "
                    "fraction of each task vector kept and must be in (0, 1]"
                )


def check_choice(specs: Sequence[TensorSpec], name: str, options: tuple[str, ...], method: str) -> None:
    for spec in specs:
        value = spec.params[name]
        if value not in options:
            raise RecipeError(
                f"parameters.{name}: `{method}` takes {' | '.join(options)}, got {value!r} "
                f"(tensor {spec.name!r})"
            )


def check_uniform(specs: Sequence[TensorSpec], name: str, why: str) -> Any:
    """The value of a parameter that must not vary by tensor (no filters or gradients)."""
    values = {repr(s.params[name]) for s in specs}
    if len(values) > 1:
        raise RecipeError(
            f"parameters.{name}: must be the same for every tensor ({why}); "
            f"filters or gradients give {len(values)} different values: {', '.join(sorted(values))}"
        )
    return specs[0].params[name] if specs else None
