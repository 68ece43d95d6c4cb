"""Recipe parameter settings: validating a setting's shape at load time and resolving it for one
tensor at layer depth t (mergekit semantics: scalar, gradient, or ``{filter, value}`` list)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from weightsmith.errors import RecipeError
from weightsmith.notices import did_you_mean, lenient


@dataclass(frozen=True)
class Conditional:
    """``{filter: substring, value: ...}``: applies to tensors whose name contains filter."""

    filter: str | None
    value: Any


def _check_finite(value: Any, where: str) -> None:
    """NaN and infinity are never meaningful weights, densities or scales; a number YAML read
    as a string (``1e999``) would become one when the parameter is converted. (Words such as
    ``nan`` may also name a checkpoint folder: numeric parameters catch those at plan time.)"""
    number = value
    if isinstance(value, str):
        if not any(ch.isdigit() for ch in value):
            return
        try:
            number = float(value)
        except ValueError:
            return
    if isinstance(number, float) and not math.isfinite(number):
        raise RecipeError(f"{where}: {value!r} is not a finite number; give a finite value")


def _check_setting(value: Any, where: str, strict: bool = False) -> Any:
    """Validate a parameter setting's shape once, at load time."""
    if isinstance(value, (bool, int, float, str)):
        _check_finite(value, where)
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if not value:
            raise RecipeError(f"{where}: empty list; give a value, a gradient or filters")
        if all(isinstance(v, (bool, int, float, str)) for v in value):
            for i, v in enumerate(value):
                _check_finite(v, f"{where}[{i}]")
            return list(value)
        conds = []
        for i, entry in enumerate(value):
            if not isinstance(entry, dict) or "value" not in entry:
                raise RecipeError(f"{where}[{i}]: expected {{filter: substring, value: ...}}, got {entry!r}")
            for key in sorted(set(entry) - {"filter", "value"}, key=str):
                hint = did_you_mean(str(key), ("filter", "value")) or " (a conditional has filter and value)"
                lenient(f"{where}[{i}]: `{key}` is not a conditional field{hint}", strict)
            filt = entry.get("filter")
            if filt is not None and not isinstance(filt, str):
                raise RecipeError(f"{where}[{i}].filter: must be a string, got {filt!r}")
            conds.append(Conditional(filt, _check_setting(entry["value"], f"{where}[{i}].value", strict)))
        return conds
    raise RecipeError(f"{where}: cannot use {value!r} as a parameter value")


def resolve_setting(setting: Any, tensor_name: str, t: float, numeric: bool = False) -> Any:
    """Evaluate a validated setting for one tensor at layer depth t (mergekit semantics).

    ``numeric``: the parameter is a number, so strings in a gradient are read as numbers
    first (YAML loads ``1e-3`` as a string) and the gradient interpolates, as in mergekit.
    """
    if isinstance(setting, list) and setting and isinstance(setting[0], Conditional):
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return resolve_setting(cond.value, tensor_name, t, numeric)
        return None
    if isinstance(setting, list) and numeric:
        setting = [_as_number(v) for v in setting]
    if isinstance(setting, list):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        if not numbers:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def _as_number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
