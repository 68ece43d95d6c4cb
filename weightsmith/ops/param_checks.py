"""Plan-time checks of a method's parameters over every tensor (``prepare`` hooks call them), so
bad values fail before any work starts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from weightsmith.errors import RecipeError
from weightsmith.ops.registry import TensorSpec


def _interval(low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"


def check_fraction(
    specs: Sequence[TensorSpec],
    name: str,
    method: str,
    *,
    meaning: str,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Every value of the fraction parameter ``name`` (per model or shared; a method's default
    where a spec lacks it) is a number in [0, 1], with an open end where the method needs one:
    density (0, 1], gamma and mask_ratio [0, 1). ``meaning`` says what the fraction is, for the
    message."""
    interval = _interval(low_open, high_open)
    for spec in specs:
        if name not in spec.params:
            continue  # the method's default applies, and it is in range
        value = spec.params[name]
        per_model = isinstance(value, (list, tuple))
        for i, v in enumerate(value if per_model else [value]):
            number = not isinstance(v, bool) and isinstance(v, (int, float))
            low_ok = number and (v > 0 if low_open else v >= 0)
            high_ok = number and (v < 1 if high_open else v <= 1)
            if low_ok and high_ok:  # NaN fails both
                continue
            whose = f" of {spec.model_label(i)}" if per_model else ""
            where = (
                f"that model's `{name}` (or parameters.{name})" if per_model else f"parameters.{name}"
            )
            raise RecipeError(
                f"{method}: {name}{whose} for tensor {spec.name!r} is {v!r}; it is {meaning} and "
                f"must be in {interval}: set {where} to a value in {interval}"
            )


def check_density(specs: Sequence[TensorSpec], method: str) -> None:
    check_fraction(specs, "density", method, meaning="the fraction of each task vector kept", low_open=True)


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
