"""engine/plan_context.py: the one frozen context the slice, module and models planners share."""

from __future__ import annotations

import dataclasses

import pytest
from models import LLAMA_CONFIG, save_pair

from weightsmith.engine.plan_context import DEFAULT_SCOPES, PlanContext, keep_all
from weightsmith.errors import RecipeError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.ops.registry import get_method
from weightsmith.pipeline import plan_merge
from weightsmith.recipe import load_recipe

FOUR = {**LLAMA_CONFIG, "num_hidden_layers": 4}


@pytest.fixture
def two(tmp_path):
    return save_pair(tmp_path, FOUR)


def _stacked(a, b, method="slerp"):
    return {
        "merge_method": method,
        "base_model": str(a),
        "parameters": {"t": 0.5},
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(a), "layer_range": [1, 4]}, {"model": str(b), "layer_range": [1, 4]}]},
        ],
    }


def test_create_resolves_the_method_and_indexes_each_ref_once(two):
    a, b = two
    recipe = load_recipe({**_stacked(a, b), "numerics": "mergekit"})
    # Opened as for any recipe: the base, then every model the slices name (the base again).
    assert [m.ref for m in recipe.models] == [str(a), str(b)]
    ckpts = [Checkpoint.open(str(a)), Checkpoint.open(str(a)), Checkpoint.open(str(b))]
    ctx = PlanContext.create(recipe, ckpts, memory_budget=1 << 20, random_seed=7)
    # A ref's first index wins.
    assert ctx.by_ref == {str(a): 0, str(b): 2}
    assert ctx.checkpoint(str(b)) is ckpts[2] and ctx.index(str(a)) == 0
    assert ctx.base_index == 0
    assert ctx.method is get_method("slerp").for_numerics("mergekit")
    assert ctx.method is not get_method("slerp")
    assert (ctx.memory_budget, ctx.random_seed, ctx.module, ctx.module_params) == (1 << 20, 7, None, {})
    with pytest.raises(RecipeError, match="no_such_method"):
        PlanContext.create(
            dataclasses.replace(recipe, merge_method="no_such_method"), ckpts, memory_budget=1
        )


def test_a_module_context_replaces_only_the_module_fields(two):
    a, b = two
    recipe = load_recipe(_stacked(a, b, "linear") | {"parameters": {"weight": 1.0}})
    ctx = PlanContext.create(recipe, [Checkpoint.open(str(a)), Checkpoint.open(str(b))], memory_budget=99)
    assert ctx.base_index is None  # linear takes no base
    scopes = (("vision_config", ("depth",)),)
    sub = ctx.for_module("vision_tower", {"weight": 0.5}, lambda k: k.startswith("v"), scopes)
    assert (sub.module, sub.module_params, sub.scopes) == ("vision_tower", {"weight": 0.5}, scopes)
    assert sub.keep("vision.x") and not sub.keep("model.x")
    assert sub.checkpoints is ctx.checkpoints and sub.method is ctx.method and sub.memory_budget == 99
    assert (ctx.module, ctx.keep, ctx.scopes) == (None, keep_all, DEFAULT_SCOPES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.memory_budget = 1  # type: ignore[misc]


def test_stacked_slices_run_the_numerics_variant_of_the_method(two):
    """A stacked (multi-slice) recipe under ``numerics: mergekit`` plans mergekit's arithmetic,
    as a models: recipe does (it used to keep the default variant)."""
    a, b = two
    plan = plan_merge({**_stacked(a, b), "numerics": "mergekit"})
    assert plan.num_layers == 5
    assert plan.method is get_method("slerp").for_numerics("mergekit")
    assert plan_merge(_stacked(a, b)).method is get_method("slerp")
