"""Sliced recipes' entry point, and ``modules:`` (mergekit 0.1.5): one sub-recipe per module of a
multi-module model (a VLM's text decoder, vision tower and projector).

A text model has one module, ``default``: ``modules: {default: {...}}`` is the top-level recipe
with the module's parameters between the slices' and the global ones. For a known
multi-module architecture, each module owns the tensors under its name prefixes (the text
decoder owns the rest), is planned on its own (its slices stack its own layers; its config
layer count is updated in its sub-config), and the tasks are joined into one plan. As in
mergekit, a module the recipe leaves out is not in the output: weightsmith refuses that instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from weightsmith.engine.keys import LAYER_COUNT_KEYS, layer_index
from weightsmith.engine.layer_origin import LayerOrigin
from weightsmith.engine.plan_context import PlanContext, finish_plan, keep_all
from weightsmith.engine.slice_layout import DEFAULT_SCOPES, Scopes, same_layer_origins
from weightsmith.engine.slices import plan_as_models, plan_slices, with_layer_map
from weightsmith.engine.tasks import MergePlan, Source, TensorTask
from weightsmith.errors import MergeError, RecipeError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.ops.registry import MergeMethod
from weightsmith.recipe import Recipe

_VISION = ("vision_config", ("num_hidden_layers", "depth"))
_TEXT = ("text_config", LAYER_COUNT_KEYS)
# Architecture -> module -> (tensor-name prefixes, where its layer count lives). mergekit 0.1.5's
# architecture definitions name the same modules; "" marks the module that owns the rest.
# Each prefix is also matched under ``model.`` (transformers 5 saves VLMs that way).
MODULES: dict[str, dict[str, tuple[tuple[str, ...], Scopes]]] = {
    "Gemma3ForConditionalGeneration": {
        "text_decoder": (("",), (_TEXT,)),
        "vision_tower": (("vision_tower.",), (_VISION,)),
        "multi_modal_projector": (("multi_modal_projector.",), ()),
    },
    "Mistral3ForConditionalGeneration": {
        "text_decoder": (("",), (_TEXT,)),
        "vision_tower": (("vision_tower.",), (_VISION,)),
        "multi_modal_projector": (("multi_modal_projector.",), ()),
    },
    "Qwen2_5_VLForConditionalGeneration": {
        "text_decoder": (("",), (_TEXT, (None, LAYER_COUNT_KEYS))),
        "vision_tower": (("visual.",), (_VISION,)),
        "multi_modal_projector": (("visual.merger.",), ()),
    },
}


def is_sliced(recipe: Recipe) -> bool:
    return recipe.slices is not None or recipe.modules is not None


def build_sliced_plan(
    recipe: Recipe,
    checkpoints: list[Checkpoint],
    *,
    memory_budget: int,
    random_seed: int | None = None,
    method: MergeMethod | None = None,
) -> MergePlan:
    """``checkpoints`` are opened as for any recipe: the base (if any), then ``recipe.models``
    (for a sliced recipe, every model it names, in order of first mention)."""
    ctx = PlanContext.create(
        recipe, checkpoints, memory_budget=memory_budget, random_seed=random_seed, method=method
    )
    if recipe.modules is None:
        assert recipe.slices is not None
        return plan_slices(ctx, recipe.slices)
    arch = _architecture(checkpoints[0])
    known = MODULES.get(arch or "", {})
    if len(recipe.modules) == 1 and next(iter(recipe.modules)) not in known:
        return _plan_module(ctx, next(iter(recipe.modules)))
    if not known:
        raise RecipeError(
            f"modules: {', '.join(recipe.modules)}: weightsmith knows no modules of architecture "
            f"{arch!r}; it knows {', '.join(MODULES)} (and `default`, a text model's one module)"
        )
    unknown = [name for name in recipe.modules if name not in known]
    missing = [name for name in known if name not in recipe.modules]
    if unknown or missing:
        raise RecipeError(
            f"modules: {arch} has modules {', '.join(known)}; "
            + (f"unknown: {', '.join(unknown)}. " if unknown else "")
            + (
                f"list {', '.join(missing)} too (mergekit would leave them out of the output)"
                if missing
                else ""
            )
        )
    subplans = []
    for name in recipe.modules:
        prefixes, scopes = known[name]
        others = [p for other, (ps, _) in known.items() if other != name for p in ps if p]

        def keep(key: str, own: tuple[str, ...] = prefixes, others: list[str] = others) -> bool:
            return _owner_match(key, own, others)

        subplans.append(_plan_module(ctx, name, keep, scopes))
    return _join(ctx, subplans)


def _owner_match(key: str, own: tuple[str, ...], others: list[str]) -> bool:
    """Whether ``key`` belongs to the module with prefixes ``own``: the longest matching prefix
    over all modules wins; "" (the text decoder) owns what no other prefix matches."""

    def best(prefixes: Any) -> int:
        return max(
            (len(p) for p in prefixes for form in (p, "model." + p) if p and key.startswith(form)),
            default=0 if "" in prefixes else -1,
        )

    return best(own) >= 0 and best(own) >= best(others) and not (best(own) == 0 and best(others) > 0)


def _plan_module(
    ctx: PlanContext, name: str, keep: Callable[[str], bool] | None = None, scopes: Scopes = DEFAULT_SCOPES
) -> MergePlan:
    """One module's plan; ``keep`` (one of several modules) picks the tensors it owns."""
    assert ctx.recipe.modules is not None
    module = ctx.recipe.modules[name]
    ctx = ctx.for_module(name, module.parameters, keep or keep_all, scopes)
    if module.models is not None:
        plan = plan_as_models(ctx, module.models, {})
    else:
        assert module.slices is not None
        plan = plan_slices(ctx, module.slices)
    if keep is not None:
        plan.tasks = [t for t in plan.tasks if keep(t.name)]
    if module.models is not None:
        layers = [n for t in plan.tasks if (n := layer_index(t.name)) is not None]
        with_layer_map(plan, same_layer_origins([m.ref for m in module.models], layers, name))
    if keep is not None:
        plan.notes = [f"module {name}: {n}" for n in plan.notes]
    return plan


def _join(ctx: PlanContext, subplans: list[MergePlan]) -> MergePlan:
    """One plan from the modules' plans: their checkpoint indices mapped onto ``checkpoints``."""
    recipe, by_ref = ctx.recipe, ctx.by_ref
    joined = list(ctx.checkpoints)
    tasks: list[TensorTask] = []
    notes: list[str] = []
    origins: list[LayerOrigin] = []
    updates: dict[str, Any] = {}
    for sub in subplans:
        where = {}
        for i, ckpt in enumerate(sub.checkpoints):
            at = next((j for j, c in enumerate(joined) if c is ckpt), None)
            if at is None:  # a checkpoint a parameter names, opened by that module's plan
                joined.append(ckpt)
                at = len(joined) - 1
            where[i] = at
        for task in sub.tasks:
            tasks.append(_remap(task, where))
        notes += sub.notes
        origins += sub.layer_origins
        for key, value in sub.config_updates.items():
            updates[key] = {**updates.get(key, {}), **value} if isinstance(value, dict) else value
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MergeError(f"modules: tensor {dup!r} is planned by two modules; report this as a bug")
    first = subplans[0]
    base_index = by_ref[recipe.base_model] if first.base_index is not None and recipe.base_model else None
    ref_index = by_ref[recipe.base_model] if recipe.base_model is not None else next(iter(by_ref.values()))
    plan = MergePlan(
        recipe,
        ctx.method,
        joined,
        base_index,
        [by_ref[first.checkpoints[i].ref] for i in first.model_indices if first.checkpoints[i].ref in by_ref],
        ref_index,
        tasks,
        ctx.memory_budget,
        first.num_layers,
        notes=notes,
        layer_origins=origins,
    )
    plan.config_updates = updates
    return finish_plan(plan)


def _remap(task: TensorTask, where: dict[int, int]) -> TensorTask:
    def src(s: Source | None) -> Source | None:
        return None if s is None else Source(where[s.ckpt], s.key, s.rows)

    aux = {k: [src(s) for s in v] if isinstance(v, list) else src(v) for k, v in task.aux.items()}
    return TensorTask(
        task.name,
        task.shape,
        task.out_dtype,
        task.kind,
        [src(s) for s in task.models],
        src(task.base),
        task.params,
        task.t,
        task.seed,
        aux,
    )


def _architecture(ckpt: Checkpoint) -> str | None:
    names = (ckpt.config or {}).get("architectures") or []
    return names[0] if names and isinstance(names[0], str) else None
