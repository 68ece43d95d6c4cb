"""What planning a recipe starts from: the recipe with the caller's numerics, its models
normalized (a base listed again among them dropped), and its inputs opened, headers only."""

from __future__ import annotations

import dataclasses

from weightsmith.engine.modules import is_sliced
from weightsmith.errors import RecipeError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.ops.registry import get_method
from weightsmith.recipe import NUMERICS, Recipe


def open_inputs(recipe: Recipe, allow_pickle: bool = False) -> list[Checkpoint]:
    """Open the base (if any) then every model, headers only."""
    refs = []
    if recipe.base_model is not None:
        refs.append(recipe.base_model)
    refs += [m.ref for m in recipe.models]
    return [Checkpoint.open(r, allow_pickle=allow_pickle, search_dirs=recipe.search_dirs) for r in refs]


def normalize_models(recipe: Recipe) -> Recipe:
    """A base listed again among the models adds a zero task vector: drop it (as mergekit).
    (A sliced recipe's models are only the inputs to open: engine/slices.py does this per slice.)"""
    if is_sliced(recipe):
        return recipe
    try:
        method = get_method(recipe.merge_method)
    except KeyError as e:
        raise RecipeError(str(e.args[0])) from None
    if recipe.base_model is not None and method.base != "unused":
        recipe.models = [m for m in recipe.models if m.ref != recipe.base_model]
        if not recipe.models:
            raise RecipeError("`models` lists only the base model; add the fine-tuned models")
    return recipe


def with_numerics(recipe: Recipe, numerics: str | None) -> Recipe:
    """The recipe with ``numerics`` (from the command line or the API) in place of its own."""
    if numerics is None or numerics == recipe.numerics:
        return recipe
    if numerics not in NUMERICS:
        raise RecipeError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
    return dataclasses.replace(recipe, numerics=numerics)
