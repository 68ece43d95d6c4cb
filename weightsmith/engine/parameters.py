"""A method's recipe parameters: checked against its schema, then resolved per tensor
(filters, layer gradients, per-model values, defaults)."""

from __future__ import annotations

import math
from typing import Any

from weightsmith.errors import RecipeError
from weightsmith.notices import did_you_mean, lenient
from weightsmith.ops.registry import REQUIRED, MergeMethod, Param
from weightsmith.recipe import Recipe
from weightsmith.recipe_settings import resolve_setting


def _convert(param: Param, value: Any, where: str) -> Any:
    if param.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        # mergekit reads every parameter as a number, so `normalize: 1.0` means true there.
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise RecipeError(f"{where}: `{param.name}` must be true or false (or 1 / 0), got {value!r}")
    if param.kind in (float, int):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise RecipeError(f"{where}: `{param.name}` must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise RecipeError(f"{where}: `{param.name}` must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise RecipeError(f"{where}: `{param.name}` must be a finite number, got {value!r}")
        return param.kind(number) if param.kind is int else number
    return value


def check_parameters(recipe: Recipe, method: MergeMethod) -> None:
    """Parameters the method does not take, and shared ones given per model, are what mergekit
    silently ignores: one warning each (errors under ``recipe.strict``). Missing required
    parameters are errors."""
    known = {p.name: p for p in method.params}
    names = ", ".join(known) or "(none)"
    for key in recipe.parameters:
        if key not in known:
            lenient(_not_taken(f"parameters.{key}", method, key, names), recipe.strict)
    for i, spec in enumerate(recipe.models):
        for key in spec.parameters:
            where = f"models[{i}] ({spec.ref}).parameters.{key}"
            if key not in known:
                lenient(_not_taken(where, method, key, names), recipe.strict)
            elif not known[key].per_model:
                lenient(
                    f"{where}: `{key}` is shared by the whole merge in `{method.name}`, so a "
                    "per-model value is not used (move it to the top-level `parameters:`)",
                    recipe.strict,
                )
    for p in method.params:
        if p.per_model and p.required and p.name not in recipe.parameters:
            for i, spec in enumerate(recipe.models):
                if p.name not in spec.parameters:
                    raise RecipeError(
                        f"models[{i}] ({spec.ref}): `{method.name}` needs `{p.name}` for every "
                        f"model; add parameters: {{{p.name}: ...}} to it or to the global parameters"
                    )
        if not p.per_model and p.required and p.name not in recipe.parameters:
            raise RecipeError(f"parameters: `{method.name}` needs `{p.name}`")


def _not_taken(where: str, method: MergeMethod, key: str, names: str) -> str:
    hint = did_you_mean(key, [p.name for p in method.params])
    return f"{where}: `{method.name}` takes no parameter `{key}` (its parameters: {names}){hint}"


def resolve_params(
    recipe: Recipe,
    method: MergeMethod,
    model_specs: list[Any],
    name: str,
    t: float,
    model_names: list[str] | None = None,
) -> dict[str, Any]:
    """``model_names``: each model's own name for the tensor, which its filters match (as in
    mergekit; a stacked layer's input name differs from the output's)."""
    out: dict[str, Any] = {}
    for p in method.params:
        numeric = p.kind in (int, float)
        if p.per_model:
            values = []
            for i, spec in enumerate(model_specs):
                own = model_names[i] if model_names is not None else name
                # As in mergekit: a model's own setting wins, but where none of its filters
                # matches this tensor the global setting applies, then the default.
                value = None
                for scope in (spec.parameters, recipe.parameters):
                    if p.name in scope:
                        value = resolve_setting(scope[p.name], own, t, numeric)
                        if value is not None:
                            break
                if value is None:
                    if p.required:
                        raise RecipeError(
                            f"model {spec.ref}: no `{p.name}` applies to tensor {name!r} (no filter "
                            "matched, here or in the global parameters); add a default entry "
                            "without a filter"
                        )
                    value = p.default
                values.append(_convert(p, value, f"model {spec.ref}"))
            out[p.name] = values
        else:
            setting = recipe.parameters.get(p.name, REQUIRED)
            value = REQUIRED if setting is REQUIRED else resolve_setting(setting, name, t, numeric)
            if value is None or value is REQUIRED:
                value = p.default
            out[p.name] = _convert(p, value, "parameters")
    return out
