"""Plans for ``slices:`` and ``modules:`` recipes (mergekit 0.1.5 semantics), from headers alone.

Two cases:

* Equivalent to a ``models:`` recipe (one slice whose every source spans its model's whole
  depth, LazyMergekit's slerp form; or a module with ``models:``): the recipe is rewritten to
  that ``models:`` recipe, with the precedence folded in, and planned by ``build_plan``, so
  the output is byte-identical to the ``models:`` form.
* Stacking (frankenmerges): output layers are numbered across slices in order; output layer
  L of a slice is the merge of layer ``start + i`` of each of its sources, renamed to
  ``layers.L``, with gradients over the slice's own depth (``t = i / (n - 1)``, or 1 for a
  one-layer slice). Tensors outside the layer stack merge the first slice's sources when they
  come before the stack (embeddings) and the last slice's after it (final norm, head), at
  t = 0 with those slices' parameters, as mergekit takes them. Every output tensor is one
  TensorTask over aligned input tensors, so memory stays bounded as in any merge.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from weightsmith.engine.keys import (
    _align_shapes,
    _num_layers,
    _sort_key,
    is_float,
    layer_index,
)
from weightsmith.engine.layer_origin import LayerOrigin
from weightsmith.engine.parameters import check_parameters, resolve_params
from weightsmith.engine.plan import _seed_for, build_plan
from weightsmith.engine.plan_context import PlanContext, finish_plan
from weightsmith.engine.slice_layout import (
    LAYER_MAP_TITLE,
    _with_layer,
    chain,
    config_updates,
    layer_map,
    slice_origins,
)
from weightsmith.engine.tasks import MergePlan, Source, TensorTask
from weightsmith.errors import MergeError, RecipeError
from weightsmith.recipe import ModelSpec, Recipe
from weightsmith.recipe_slices import SliceSpec

# Non-layer tensors that come before the layer stack (merged from the first slice).
PRE_STACK = re.compile(r"embed|wte|wpe|word_embeddings|patch_embed|position_embedding")


def plan_slices(ctx: PlanContext, slices: list[SliceSpec]) -> MergePlan:
    """One module's slices: the equivalent models: plan when the slices are one full-range
    slice, else a stacked plan (``ctx.keep`` picks the module's tensors, ``ctx.scopes`` its
    config)."""
    if _is_full_range(ctx, slices):
        piece = slices[0]
        plan = plan_as_models(ctx, [ModelSpec(s.ref, s.parameters) for s in piece.sources], piece.parameters)
        return with_layer_map(plan, slice_origins(slices, ctx.module))
    return _stacked_plan(ctx, slices)


def with_layer_map(plan: MergePlan, origins: list[LayerOrigin]) -> MergePlan:
    """``plan`` knowing where its output layers come from, the map first among its notes."""
    plan.layer_origins = origins
    if origins:
        plan.notes[:0] = [LAYER_MAP_TITLE, *layer_map(origins)]
    return plan


def _is_full_range(ctx: PlanContext, slices: list[SliceSpec]) -> bool:
    if len(slices) != 1 or slices[0].base_model not in (None, ctx.recipe.base_model):
        return False
    return all(s.layer_range == (0, _num_layers(ctx.checkpoint(s.ref))) for s in slices[0].sources)


def _view(ctx: PlanContext, specs: list[ModelSpec], slice_params: dict[str, Any], where: str) -> Recipe:
    """A models-recipe view whose two-level parameters (model, global) carry the precedence
    source > slice > module > global."""
    recipe, method, module_params = ctx.recipe, ctx.method, ctx.module_params
    known = {p.name: p for p in method.params}
    for scope, at in ((slice_params, f"{where}.parameters"), (module_params, "module parameters")):
        for key in scope:
            if key not in known:
                raise RecipeError(
                    f"{at}.{key}: `{method.name}` has no parameter `{key}`; its parameters: "
                    f"{', '.join(known) or '(none)'}"
                )
    per_model = [p.name for p in method.params if p.per_model]
    models = [
        ModelSpec(
            s.ref,
            {
                **s.parameters,
                **{
                    k: v
                    for k in per_model
                    if (v := chain(s.parameters.get(k), slice_params.get(k), module_params.get(k)))
                    is not None
                },
            },
        )
        for s in specs
    ]
    names = set(recipe.parameters) | set(slice_params) | set(module_params)
    shared = {k: chain(slice_params.get(k), module_params.get(k), recipe.parameters.get(k)) for k in names}
    view = replace(recipe, models=models, parameters=shared, slices=None, modules=None)
    check_parameters(view, method)
    return view


def plan_as_models(ctx: PlanContext, specs: list[ModelSpec], slice_params: dict[str, Any]) -> MergePlan:
    """The ``models:`` plan equivalent to one full-range slice (or a module's ``models:``)."""
    recipe, method = ctx.recipe, ctx.method
    listed = {s.ref for s in specs}
    if recipe.base_model is not None and method.base != "unused":
        # As normalize_models does for a models: recipe: the base among the models is the base,
        # so its parameters are never read (a base source without `weight` is fine, as in
        # mergekit). A slice of the base alone (a LoRA applied to it, say) keeps it as its one
        # model: its task vector is zero, so the output is the base, as in mergekit.
        specs = [s for s in specs if s.ref != recipe.base_model] or specs
    view = _view(ctx, specs, slice_params, "slices[0]")
    if recipe.base_model is not None and method.base == "unused" and recipe.base_model not in listed:
        # mergekit merges only a slice's sources: a base no source names is not an input.
        view.base_model = None
    ordered = ([view.base_model] if view.base_model is not None else []) + [m.ref for m in view.models]
    return build_plan(
        view,
        [ctx.checkpoint(r) for r in ordered],
        memory_budget=ctx.memory_budget,
        random_seed=ctx.random_seed,
        method=method,
    )


def _stacked_plan(ctx: PlanContext, slices: list[SliceSpec]) -> MergePlan:
    pieces = [_SlicePlan(ctx, k, s) for k, s in enumerate(slices)]
    ref_index = ctx.index(ctx.recipe.base_model) if ctx.recipe.base_model is not None else pieces[0].first
    tasks: list[TensorTask] = []
    layer_sources: list[tuple[int, int]] = []  # output layer -> (checkpoint, input layer)
    out_layer = 0
    for piece in pieces:
        for i in range(piece.spec.length):
            t = i / (piece.spec.length - 1) if piece.spec.length > 1 else 1.0
            tasks += piece.layer_tasks(i, out_layer, t)
            layer_sources.append((piece.first, piece.spec.sources[0].layer_range[0] + i))
            out_layer += 1
    pre = [n for n in pieces[0].outside_names() if PRE_STACK.search(n)]
    post = [n for n in pieces[-1].outside_names() if not PRE_STACK.search(n)]
    tasks = [pieces[0].outside_task(n) for n in pre] + tasks + [pieces[-1].outside_task(n) for n in post]
    widest = max(pieces, key=lambda p: len(p.models))
    plan = MergePlan(
        ctx.recipe,
        ctx.method,
        ctx.checkpoints,
        ctx.base_index,
        [src.ckpt for src in widest.models],
        ref_index,
        tasks,
        ctx.memory_budget,
        out_layer,
    )
    plan.config_updates = config_updates(ctx.checkpoints, ref_index, layer_sources, ctx.scopes)
    return finish_plan(with_layer_map(plan, slice_origins(slices, ctx.module)))


class _SlicePlan:
    """One slice's inputs: its base and model sources, its parameter view, its tensor names."""

    def __init__(self, ctx: PlanContext, k: int, spec: SliceSpec) -> None:
        self.ctx, self.spec = ctx, spec
        recipe, method = ctx.recipe, ctx.method
        self.where = f"slices[{k}]"
        base = spec.base_model or recipe.base_model
        if method.base == "unused":
            base = None
        sources = list(spec.sources)
        self.base = None
        if base is not None:
            among = [s for s in sources if s.ref == base]
            if among:
                self.base = among[0]
                sources = [s for s in sources if s.ref != base]
            elif method.base == "required":
                raise RecipeError(
                    f"{self.where}: base_model {base} is not among the slice's sources; `{method.name}` "
                    "needs it: add it as a source with the same layer_range length"
                )
        if not sources and self.base is not None:
            sources = [self.base]  # the base alone: a zero task vector, the output is the base
        n = len(sources)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            most = f" and at most {method.max_models}" if method.max_models is not None else ""
            raise RecipeError(
                f"{self.where}: `{method.name}` takes at least {method.min_models}{most} model(s) "
                f"besides the base per slice; this slice has {n} ({', '.join(s.ref for s in sources)})"
            )
        self.sources = sources
        self.view = _view(ctx, [ModelSpec(s.ref, s.parameters) for s in sources], spec.parameters, self.where)
        self.models = [Source(ctx.index(s.ref), "") for s in sources]
        self.base_ckpt = ctx.index(self.base.ref) if self.base is not None else None
        # The checkpoint whose tensor names and dtypes the slice's outputs follow.
        self.first = self.base_ckpt if self.base_ckpt is not None else self.models[0].ckpt

    def outside_names(self) -> list[str]:
        keys = self.ctx.checkpoints[self.first].keys()
        return sorted((k for k in keys if layer_index(k) is None and self.ctx.keep(k)), key=_sort_key)

    def layer_tasks(self, i: int, out_layer: int, t: float) -> list[TensorTask]:
        ref_src = self.base or self.sources[0]
        ref_layer = ref_src.layer_range[0] + i
        ref_ckpt = self.ctx.checkpoints[self.first]
        names = sorted(
            (k for k in ref_ckpt.keys() if layer_index(k) == ref_layer and self.ctx.keep(k)), key=_sort_key
        )
        if not names:
            raise MergeError(
                f"model {ref_ckpt.ref!r} ({ref_ckpt.root}): has no layer {ref_layer} "
                f"({self.where}: layer_range {list(ref_src.layer_range)}); it has "
                f"{_num_layers(ref_ckpt)} layers"
            )
        tasks = []
        for name in names:
            keys = [_with_layer(name, s.layer_range[0] + i) for s in self.sources]
            base_key = _with_layer(name, self.base.layer_range[0] + i) if self.base else None
            tasks.append(self._task(name, _with_layer(name, out_layer), keys, base_key, t))
        return tasks

    def outside_task(self, name: str) -> TensorTask:
        return self._task(name, name, [name] * len(self.sources), name if self.base else None, 0.0)

    def _task(
        self, ref_name: str, out_name: str, keys: list[str], base_key: str | None, t: float
    ) -> TensorTask:
        recipe, method, ckpts = self.ctx.recipe, self.ctx.method, self.ctx.checkpoints
        sources = [Source(m.ckpt, key) for m, key in zip(self.models, keys)]
        base_src = (
            Source(self.base_ckpt, base_key) if base_key is not None and self.base_ckpt is not None else None
        )
        for src in [*sources, *([base_src] if base_src else [])]:
            if src.key not in ckpts[src.ckpt]:
                raise MergeError(
                    f"model {ckpts[src.ckpt].ref!r} ({ckpts[src.ckpt].root}): has no tensor {src.key!r}, "
                    f"which {self.where} needs for output tensor {out_name!r}; the slice's sources "
                    "must share one architecture and have the layers their layer_range names"
                )
        ref_entry = ckpts[self.first].entry(ref_name)
        if not is_float(ref_entry.dtype):
            copy_src = base_src or sources[0]
            return TensorTask(out_name, ref_entry.shape, ref_entry.dtype, "copy", [], copy_src)
        shape, sources, base_src = _align_shapes(recipe, ckpts, ref_name, ref_entry.shape, sources, base_src)
        # Per-model filters match each input's own name (mergekit), shared ones the output's.
        params = resolve_params(self.view, method, self.view.models, out_name, t, [s.key for s in sources])
        out_dtype = recipe.out_dtype or recipe.dtype or ref_entry.dtype
        task_seed = _seed_for(self.ctx.random_seed or 0, out_name) if method.uses_randomness else None
        return TensorTask(out_name, shape, out_dtype, "merge", sources, base_src, params, t, task_seed)
