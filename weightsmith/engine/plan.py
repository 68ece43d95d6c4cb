"""MergePlan: one task per output tensor, built from headers alone (no tensor data is read).

The plan fixes everything before work starts: which inputs feed each output tensor, every
parameter resolved for that tensor, output dtypes and shapes (so shard layout is known up
front), and how huge tensors are split into row blocks to stay under the memory budget.
"""

from __future__ import annotations

from typing import Any

from weightsmith.dtype_names import dtype_name
from weightsmith.engine.keys import (
    _align_shapes,
    _find_key,
    _is_alias_only,
    _num_layers,
    _sort_key,
    is_float,
    key_prefix_map,
    layer_index,
)
from weightsmith.engine.parameters import check_parameters, resolve_params
from weightsmith.engine.plan_context import CheckpointOpener, PlanContext, finish_plan, open_checkpoint
from weightsmith.engine.tasks import MergePlan, Source, TensorTask
from weightsmith.engine.vocab_rows import fill_bytes, gather_sources
from weightsmith.errors import MergeError, RecipeError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.notices import collecting
from weightsmith.ops.registry import MergeMethod
from weightsmith.recipe import ModelSpec, Recipe


def _seed_for(seed: int, name: str) -> int:
    # Stable across runs, processes and batching: derived from the seed and the tensor name.
    import hashlib

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def build_plan(
    recipe: Recipe,
    checkpoints: list[Checkpoint],
    *,
    memory_budget: int,
    random_seed: int | None = None,
    method: MergeMethod | None = None,
    vocab: Any = None,
    open_aux: CheckpointOpener = open_checkpoint,
) -> MergePlan:
    """Build the plan. ``checkpoints`` are base first (if the recipe has one), then models.

    ``method`` stands in for the registry's ``recipe.merge_method`` when given (the lazy API's
    checkpoint expressions are methods of their own, planned the same way). ``vocab`` (an
    ``io/tokenizer_build.VocabAlignment``) maps the vocabulary tensors' rows to a merged
    tokenizer. ``open_aux`` opens the checkpoints that parameters name (``Checkpoint.open``
    unless a caller reuses its own). The plan's ``warnings`` are the recipe's and those given
    while planning.
    """
    with collecting() as warnings:
        ctx = PlanContext.create(
            recipe, checkpoints, memory_budget=memory_budget, random_seed=random_seed, method=method,
            open_aux=open_aux,
        )
        plan = _build_plan(ctx, vocab)
    plan.warnings = [*recipe.warnings, *(w for w in warnings if w not in recipe.warnings)]
    return plan


def _build_plan(ctx: PlanContext, vocab: Any) -> MergePlan:
    recipe, method, checkpoints = ctx.recipe, ctx.method, ctx.checkpoints
    check_parameters(recipe, method)
    has_base = recipe.base_model is not None and method.base != "unused"
    if method.base == "required" and not has_base:
        raise RecipeError(f"`{method.name}` needs a base_model: the model the fine-tunes started from")
    base_index = 0 if has_base else None
    first_model = 1 if recipe.base_model is not None else 0
    model_indices = list(range(first_model, len(checkpoints)))
    specs = [recipe.models[i - first_model] for i in model_indices]
    base_unlisted = all(m.ref != recipe.base_model for m in recipe.models)
    if recipe.base_model is not None and not has_base and base_unlisted:
        # A method without a base (linear) still merges a base_model that `models` does not
        # list, as one more input after the others, weighted by the global parameters: what
        # mergekit does with the same recipe.
        model_indices.append(0)
        specs.append(ModelSpec(recipe.base_model))
        missing = [
            p.name for p in method.params if p.per_model and p.required and p.name not in recipe.parameters
        ]
        if missing:
            raise RecipeError(
                f"base_model {recipe.base_model}: `{method.name}` merges it as one more input, so it "
                f"needs `{missing[0]}`: list it under models with parameters: {{{missing[0]}: ...}} "
                "or set a global value under parameters:"
            )
    n = len(model_indices)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = (
            f"exactly {method.min_models}"
            if method.min_models == method.max_models
            else f"at least {method.min_models}"
            + (f" and at most {method.max_models}" if method.max_models else "")
        )
        raise RecipeError(f"`{method.name}` takes {want} model(s) besides the base; got {n}")
    # The base (or, without one, the first model) defines the output's tensors and config.
    ref_index = 0 if recipe.base_model is not None else model_indices[0]
    ref_ckpt = checkpoints[ref_index]
    num_layers = _num_layers(ref_ckpt)
    aux_refs = _open_aux_checkpoints(ctx, specs)
    result_dtype = method.result_dtype(recipe.compute_dtype) if method.result_dtype else None
    tasks: list[TensorTask] = []
    used: list[set[str]] = [set() for _ in checkpoints]
    prefixes = {
        idx: key_prefix_map(ref_ckpt.keys(), checkpoints[idx])
        for idx in [*model_indices, *{i for refs in aux_refs.values() for i in refs if i is not None}]
    }
    notes = [
        f"model {checkpoints[idx].ref!r}: tensor names mapped "
        f"{(strip or '<none>')!r} -> {(add or '<none>')!r} to match the reference"
        for idx, (strip, add) in prefixes.items()
        if strip or add
    ]
    for name in sorted(ref_ckpt.keys(), key=_sort_key):
        ref_entry = ref_ckpt.entry(name)
        used[ref_index].add(name)
        if not is_float(ref_entry.dtype):
            # Integer and bool buffers (position ids, masks, counters) are never merged: they
            # come from the reference, and inputs need not have them (transformers often
            # leaves such buffers out of newer saves). One that is float elsewhere is not a
            # buffer: copying it would drop the fine-tunes silently.
            for idx in model_indices:
                key = _find_key(checkpoints[idx], name, prefixes[idx])
                if key is not None:
                    used[idx].add(key)
                    _check_same_kind(checkpoints, ref_index, name, idx, key)
            src = Source(ref_index, name)
            tasks.append(TensorTask(name, ref_entry.shape, ref_entry.dtype, "copy", [], src))
            continue
        sources = []
        for idx in model_indices:
            key = _find_key(checkpoints[idx], name, prefixes[idx])
            if key is None:
                raise MergeError(
                    f"model {checkpoints[idx].ref!r} ({checkpoints[idx].root}): has no tensor "
                    f"{name!r}, which the {'base' if base_index is not None else 'first model'} "
                    "has; all inputs must share one architecture"
                )
            used[idx].add(key)
            _check_same_kind(checkpoints, ref_index, name, idx, key)
            sources.append(Source(idx, key))
        base_src = Source(0, name) if base_index is not None else None
        gathered = vocab and gather_sources(vocab, checkpoints, name, ref_entry.shape, sources, base_src)
        shape, sources, base_src = gathered or _align_shapes(
            recipe, checkpoints, name, ref_entry.shape, sources, base_src
        )
        idx = layer_index(name)
        t = 0.0
        if idx is not None and num_layers:
            t = idx / (num_layers - 1) if num_layers > 1 else 1.0
        params = resolve_params(recipe, method, specs, name, t)
        out_dtype = recipe.out_dtype or result_dtype or recipe.dtype or ref_entry.dtype
        seed = _seed_for(ctx.random_seed or 0, name) if method.uses_randomness else None
        aux = {p: _aux_sources(ctx, p, refs, prefixes, name, shape) for p, refs in aux_refs.items()}
        tasks.append(
            TensorTask(name, shape, out_dtype, "merge", sources, base_src, params, t, seed, aux)
        )
    dropped: dict[str, list[str]] = {}
    for idx, ckpt in enumerate(checkpoints):
        extra = [k for k in ckpt.keys() if k not in used[idx] and not _is_alias_only(k, used[idx])]
        if not extra or (idx not in model_indices and idx != base_index):
            continue
        dropped.setdefault(ckpt.ref, []).extend(extra)
        if recipe.extra_keys == "error":
            shown = ", ".join(repr(k) for k in extra[:5]) + (" ..." if len(extra) > 5 else "")
            raise MergeError(
                f"model {ckpt.ref!r} ({ckpt.root}): {len(extra)} tensor(s) the output does not "
                f"have: {shown}. Inputs must share one architecture; set `extra_keys: ignore` "
                "in the recipe (extra_keys=\"ignore\" in Python's save) to drop them"
            )
    plan = MergePlan(
        recipe,
        method,
        checkpoints,
        base_index,
        model_indices,
        ref_index,
        tasks,
        ctx.memory_budget,
        num_layers,
        notes=notes,
        vocab=vocab,
        random_seed=(ctx.random_seed or 0) if method.uses_randomness else None,
        key_mappings={checkpoints[i].ref: p for i, p in prefixes.items() if p != ("", "")},
        dropped=dropped,
    )
    if vocab is not None:
        plan.notes += vocab.notes
        plan.fill_bytes = sum(
            fill_bytes(t.models[0].gather, t.numel // t.shape[0], len(t.models) + 1, 8)
            for t in tasks if t.models and t.models[0].gather is not None
        )
    # The method checks its parameters over all tensors now, before any work starts, and says
    # whether it needs model-wide statistics passes (engine/passes.py).
    return finish_plan(plan)


def _check_same_kind(checkpoints: list[Checkpoint], ref: int, name: str, idx: int, key: str) -> None:
    """An integer (or bool) tensor where the reference has a float one, or the reverse, is
    refused: merging integers as numbers, or copying the reference and ignoring the others,
    would both give a silently wrong model."""
    ref_dtype, dtype = checkpoints[ref].entry(name).dtype, checkpoints[idx].entry(key).dtype
    if is_float(ref_dtype) == is_float(dtype):
        return
    odd, other = (idx, ref) if is_float(ref_dtype) else (ref, idx)
    odd_dtype = checkpoints[odd].entry(key if odd == idx else name).dtype
    other_dtype = checkpoints[other].entry(key if other == idx else name).dtype
    raise MergeError(
        f"model {checkpoints[odd].ref!r} ({checkpoints[odd].root}): tensor {name!r} is "
        f"{dtype_name(odd_dtype)} but {checkpoints[other].ref!r} has it as "
        f"{dtype_name(other_dtype)}; integer and float tensors cannot be merged. Re-save that "
        "model with the tensor in floating point (or check it is the right checkpoint)"
    )




def _open_aux_checkpoints(ctx: PlanContext, specs: list[Any]) -> dict[str, list[int | None]]:
    """Open the checkpoints that checkpoint-valued parameters name; append them to
    ``ctx.checkpoints``. Returns, per parameter, checkpoint indices (one per model, or one)."""
    recipe, method, checkpoints = ctx.recipe, ctx.method, ctx.checkpoints
    opened: dict[str, int] = {}
    out: dict[str, list[int | None]] = {}
    for p in method.params:
        if not p.checkpoint:
            continue
        values = (
            [spec.parameters.get(p.name, recipe.parameters.get(p.name)) for spec in specs]
            if p.per_model
            else [recipe.parameters.get(p.name)]
        )
        indices: list[int | None] = []
        for value in values:
            if value is None:
                if p.required:
                    raise RecipeError(f"`{method.name}` needs `{p.name}`: a checkpoint path or Hub id")
                indices.append(None)
                continue
            if not isinstance(value, str):
                raise RecipeError(
                    f"`{p.name}` names a checkpoint (a path or Hub id); it cannot vary by tensor "
                    f"or layer, got {value!r}"
                )
            if value not in opened:
                checkpoints.append(ctx.open_aux(value, recipe.search_dirs))
                opened[value] = len(checkpoints) - 1
            indices.append(opened[value])
        out[p.name] = indices
    return out


def _aux_sources(
    ctx: PlanContext,
    pname: str,
    refs: list[int | None],
    prefixes: dict[int, tuple[str, str]],
    name: str,
    shape: tuple[int, ...],
) -> Any:
    """Where checkpoint-valued parameter ``pname``'s tensors for output ``name`` live: one per
    checkpoint index in ``refs`` (None where absent)."""
    checkpoints = ctx.checkpoints
    sources: list[Source | None] = []
    for idx in refs:
        if idx is None:
            sources.append(None)
            continue
        ckpt = checkpoints[idx]
        key = _find_key(ckpt, name, prefixes.get(idx, ("", "")))
        if key is None:
            sources.append(None)
            continue
        have = ckpt.entry(key).shape
        if have == shape:
            sources.append(Source(idx, key))
        elif have[1:] == shape[1:] and have and ctx.recipe.vocab_policy != "error":
            sources.append(Source(idx, key, have[0]))  # padded with zero rows, or truncated
        else:
            raise MergeError(
                f"model {ckpt.ref!r} ({ckpt.entry(key).path}), given as `{pname}`: tensor {key!r} "
                f"has shape {list(have)} but the output has {list(shape)}"
                + ("; set vocab_policy: pad or truncate" if have[1:] == shape[1:] else "")
            )
    param = ctx.method.param(pname)
    return sources if param is not None and param.per_model else sources[0]


