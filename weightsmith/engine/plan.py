"""MergePlan: one task per output tensor, built from headers alone (no tensor data is read).

The plan fixes everything before work starts: which inputs feed each output tensor, every
parameter resolved for that tensor, output dtypes and shapes (so shard layout is known up
front), and how huge tensors are split into row blocks to stay under the memory budget.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from weightsmith.errors import MergeError, RecipeError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.io.safetensors_format import element_size
from weightsmith.ops.registry import REQUIRED, MergeMethod, Param, get_method
from weightsmith.recipe import ModelSpec, Recipe, resolve_setting

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)\.")
# Output key -> input keys that hold the same tensor when weights are tied.
TIED_ALIASES: dict[str, tuple[str, ...]] = {
    "lm_head.weight": (
        "model.embed_tokens.weight",
        "transformer.wte.weight",
        "embed_tokens.weight",
    ),
    "model.embed_tokens.weight": ("lm_head.weight",),
    "cls.predictions.decoder.weight": ("bert.embeddings.word_embeddings.weight",),
    "embed_out.weight": ("gpt_neox.embed_in.weight",),
}
VOCAB_NAME = re.compile(r"embed|lm_head|wte|word_embeddings|embed_out|shared\.weight|decoder\.weight")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_index(name: str) -> int | None:
    m = LAYER_PATTERN.search(name)
    return int(m.group(1)) if m else None


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


@dataclass(frozen=True)
class Source:
    """One input of a task: checkpoint index, key in that checkpoint, rows it really has."""

    ckpt: int
    key: str
    rows: int | None = None  # set when vocab_policy pads or truncates this input


@dataclass
class TensorTask:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    kind: str  # "merge" or "copy"
    models: list[Source]
    base: Source | None
    params: dict[str, Any] = field(default_factory=dict)
    t: float = 0.0
    seed: int | None = None
    # checkpoint-valued parameters: name -> Source (shared) or list of Source per model;
    # None where that checkpoint lacks the tensor
    aux: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def out_bytes(self) -> int:
        return self.numel * element_size(self.out_dtype)


@dataclass(frozen=True)
class WorkUnit:
    """A task, or a block of its rows ``[start, stop)``; memory is bounded by the slots."""

    task: TensorTask
    rows: tuple[int, int] | None


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    checkpoints: list[Checkpoint]
    base_index: int | None
    model_indices: list[int]
    ref_index: int  # the checkpoint whose config, key set and tokenizer the output follows
    tasks: list[TensorTask]
    memory_budget: int
    num_layers: int | None
    units: list[WorkUnit] = field(default_factory=list)
    oversize: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def compute_dtype(self) -> torch.dtype:
        wanted = self.method.compute_dtype
        if wanted is not None and element_size(wanted) > element_size(self.recipe.compute_dtype):
            return wanted
        return self.recipe.compute_dtype

    @property
    def bytes_to_read(self) -> int:
        total = 0
        for task in self.tasks:
            for src in [*task.models, *([task.base] if task.base else []), *aux_sources(task)]:
                if task.kind == "copy" and src is not task.base:
                    continue
                total += self.checkpoints[src.ckpt].entry(src.key).nbytes
        return total

    @property
    def bytes_to_write(self) -> int:
        return sum(t.out_bytes for t in self.tasks)

    @property
    def peak_estimate(self) -> int:
        """Tensor memory at the busiest moment: SLOTS slots of the largest unit, one unit's
        scratch, and any oversize tensor's one-off buffers."""
        slot_bytes, scratch = bytes_per_element(self)
        merge_units = [u for u in self.units if u.task.kind == "merge"]
        fitting = [
            (u.rows[1] - u.rows[0]) * (u.task.numel // u.task.shape[0]) if u.rows else u.task.numel
            for u in merge_units
            if u.task.name not in self.oversize
        ]
        cap = max(fitting, default=0)
        biggest_oversize = max(
            (u.task.numel for u in merge_units if u.task.name in self.oversize), default=0
        )
        return SLOTS * slot_bytes * cap + scratch * max(cap, biggest_oversize) + (
            (slot_bytes * biggest_oversize) if biggest_oversize else 0
        )

    @property
    def out_vocab_rows(self) -> int | None:
        for task in self.tasks:
            if any(s.rows is not None for s in [*task.models, task.base] if s):
                return task.shape[0]
        return None


def aux_sources(task: TensorTask) -> list[Source]:
    """Every Source of a task's checkpoint-valued parameters."""
    out: list[Source] = []
    for value in task.aux.values():
        for src in value if isinstance(value, list) else [value]:
            if src is not None:
                out.append(src)
    return out


def _seed_for(seed: int, name: str) -> int:
    # Stable across runs, processes and batching: derived from the seed and the tensor name.
    import hashlib

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sort_key(name: str) -> tuple[int, int, str]:
    idx = layer_index(name)
    if idx is not None:
        return (1, idx, name)
    return (0 if VOCAB_NAME.search(name) and "lm_head" not in name else 2, 0, name)


def _convert(param: Param, value: Any, where: str) -> Any:
    if param.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise RecipeError(f"{where}: `{param.name}` must be true or false, got {value!r}")
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
    """Unknown or misplaced parameters are errors, not silently ignored."""
    known = {p.name: p for p in method.params}
    names = ", ".join(known) or "(none)"
    for key in recipe.parameters:
        if key not in known:
            raise RecipeError(
                f"parameters.{key}: `{method.name}` has no parameter `{key}`; its parameters: {names}"
            )
    for i, spec in enumerate(recipe.models):
        for key in spec.parameters:
            if key not in known:
                raise RecipeError(
                    f"models[{i}] ({spec.ref}).parameters.{key}: `{method.name}` has no parameter "
                    f"`{key}`; its parameters: {names}"
                )
            if not known[key].per_model:
                raise RecipeError(
                    f"models[{i}] ({spec.ref}).parameters.{key}: `{key}` is shared by the whole "
                    f"merge in `{method.name}`; move it to the top-level `parameters:`"
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


def resolve_params(
    recipe: Recipe, method: MergeMethod, model_specs: list[Any], name: str, t: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in method.params:
        numeric = p.kind in (int, float)
        if p.per_model:
            values = []
            for spec in model_specs:
                # As in mergekit: a model's own setting wins, but where none of its filters
                # matches this tensor the global setting applies, then the default.
                value = None
                for scope in (spec.parameters, recipe.parameters):
                    if p.name in scope:
                        value = resolve_setting(scope[p.name], name, t, numeric)
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


def build_plan(
    recipe: Recipe,
    checkpoints: list[Checkpoint],
    *,
    memory_budget: int,
    random_seed: int | None = None,
) -> MergePlan:
    """Build the plan. ``checkpoints`` are base first (if the recipe has one), then models."""
    try:
        method = get_method(recipe.merge_method)
    except KeyError as e:
        raise RecipeError(str(e.args[0])) from None
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
    aux_refs = _open_aux_checkpoints(recipe, method, specs, checkpoints)
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
        shape, sources, base_src = _align_shapes(
            recipe, checkpoints, name, ref_entry.shape, sources, base_src
        )
        idx = layer_index(name)
        t = 0.0
        if idx is not None and num_layers:
            t = idx / (num_layers - 1) if num_layers > 1 else 1.0
        params = resolve_params(recipe, method, specs, name, t)
        out_dtype = recipe.out_dtype or recipe.dtype or ref_entry.dtype
        seed = _seed_for(random_seed or 0, name) if method.uses_randomness else None
        aux = {
            pname: _aux_sources(recipe, checkpoints, name, shape, refs, prefixes, method, pname)
            for pname, refs in aux_refs.items()
        }
        tasks.append(
            TensorTask(name, shape, out_dtype, "merge", sources, base_src, params, t, seed, aux)
        )
    if recipe.extra_keys == "error":
        for idx, ckpt in enumerate(checkpoints):
            extra = [k for k in ckpt.keys() if k not in used[idx] and not _is_alias_only(k, used[idx])]
            if extra and (idx in model_indices or idx == base_index):
                shown = ", ".join(repr(k) for k in extra[:5]) + (" ..." if len(extra) > 5 else "")
                raise MergeError(
                    f"model {ckpt.ref!r} ({ckpt.root}): {len(extra)} tensor(s) the output does not "
                    f"have: {shown}. Inputs must share one architecture; set `extra_keys: ignore` "
                    "in the recipe to drop them"
                )
    plan = MergePlan(
        recipe,
        method,
        checkpoints,
        base_index,
        model_indices,
        ref_index,
        tasks,
        memory_budget,
        num_layers,
        notes=notes,
    )
    split_units(plan)
    # The method checks its parameters over all tensors now, before any work starts, and says
    # whether it needs model-wide statistics passes (engine/passes.py).
    from weightsmith.engine.passes import describe, prepare_statistics

    note = describe(prepare_statistics(plan))
    if note:
        plan.notes.append(note)
    return plan


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
        f"{_dtype_name(odd_dtype)} but {checkpoints[other].ref!r} has it as "
        f"{_dtype_name(other_dtype)}; integer and float tensors cannot be merged. Re-save that "
        "model with the tensor in floating point (or check it is the right checkpoint)"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _open_aux_checkpoints(
    recipe: Recipe, method: MergeMethod, specs: list[Any], checkpoints: list[Checkpoint]
) -> dict[str, list[int | None]]:
    """Open the checkpoints that checkpoint-valued parameters name; append them to
    ``checkpoints``. Returns, per parameter, checkpoint indices (one per model, or one)."""
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
                checkpoints.append(Checkpoint.open(value, search_dirs=recipe.search_dirs))
                opened[value] = len(checkpoints) - 1
            indices.append(opened[value])
        out[p.name] = indices
    return out


def _aux_sources(
    recipe: Recipe,
    checkpoints: list[Checkpoint],
    name: str,
    shape: tuple[int, ...],
    refs: list[int | None],
    prefixes: dict[int, tuple[str, str]],
    method: MergeMethod,
    pname: str,
) -> Any:
    """Where each checkpoint-valued parameter's tensor for ``name`` lives (None if absent)."""
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
        elif have[1:] == shape[1:] and have and recipe.vocab_policy != "error":
            sources.append(Source(idx, key, have[0]))  # padded with zero rows, or truncated
        else:
            raise MergeError(
                f"model {ckpt.ref!r} ({ckpt.entry(key).path}), given as `{pname}`: tensor {key!r} "
                f"has shape {list(have)} but the output has {list(shape)}"
                + ("; set vocab_policy: pad or truncate" if have[1:] == shape[1:] else "")
            )
    param = method.param(pname)
    return sources if param is not None and param.per_model else sources[0]


def _is_alias_only(key: str, used: set[str]) -> bool:
    return any(key in aliases and out in used for out, aliases in TIED_ALIASES.items())


def key_prefix_map(ref_keys: list[str], ckpt: Checkpoint) -> tuple[str, str]:
    """How this input names the reference's tensors: (prefix to strip, prefix to add).

    A fine-tuned task model often wraps the encoder it started from (``bert.`` before every
    name of a ``BertModel`` base, plus a new head); mapping by a common prefix lets such
    checkpoints merge with their base without renaming files.
    """
    keys = set(ckpt.keys())
    if sum(k in keys for k in ref_keys) * 2 >= len(ref_keys):
        return ("", "")
    best, best_hits = ("", ""), sum(k in keys for k in ref_keys)
    adds = {k.split(".", 1)[0] + "." for k in keys if "." in k}
    strips = {k.split(".", 1)[0] + "." for k in ref_keys if "." in k}
    candidates = [("", a) for a in adds] + [(s, "") for s in strips]
    candidates += [(s, a) for s in strips for a in adds if s != a]
    for strip, add in candidates:
        hits = sum(
            k.startswith(strip) and add + k[len(strip) :] in keys for k in ref_keys
        )
        if hits > best_hits:
            best, best_hits = (strip, add), hits
    return best if best_hits * 2 >= len(ref_keys) else ("", "")


def _find_key(ckpt: Checkpoint, name: str, prefix: tuple[str, str] = ("", "")) -> str | None:
    strip, add = prefix
    mapped = add + name[len(strip) :] if name.startswith(strip) else name
    for candidate in (mapped, name):
        if candidate in ckpt:
            return candidate
    tie = (ckpt.config or {}).get("tie_word_embeddings", True)
    for alias in TIED_ALIASES.get(name, ()):
        mapped_alias = add + alias[len(strip) :] if alias.startswith(strip) else alias
        for candidate in (mapped_alias, alias):
            if candidate in ckpt and tie:
                return candidate
    return None


def _num_layers(ckpt: Checkpoint) -> int | None:
    config = ckpt.config or {}
    for cfg in (config, config.get("text_config") or {}):
        for key in LAYER_COUNT_KEYS:
            if isinstance(cfg.get(key), int):
                return int(cfg[key])
    indices = [i for i in (layer_index(k) for k in ckpt.keys()) if i is not None]
    return max(indices) + 1 if indices else None


def _align_shapes(
    recipe: Recipe,
    checkpoints: list[Checkpoint],
    name: str,
    ref_shape: tuple[int, ...],
    sources: list[Source],
    base: Source | None,
) -> tuple[tuple[int, ...], list[Source], Source | None]:
    """Check all inputs agree on shape; apply vocab_policy to vocabulary-sized tensors."""
    every = ([base] if base else []) + sources
    shapes = [checkpoints[s.ckpt].entry(s.key).shape for s in every]
    if all(s == ref_shape for s in shapes):
        return ref_shape, sources, base
    for src, shape in zip(every, shapes):
        if shape != ref_shape and (len(shape) != len(ref_shape) or shape[1:] != ref_shape[1:] or not shape):
            ckpt = checkpoints[src.ckpt]
            raise MergeError(
                f"model {ckpt.ref!r} ({ckpt.entry(src.key).path}): tensor {src.key!r} has shape "
                f"{list(shape)} but the reference has {list(ref_shape)}; these models do not share "
                "an architecture"
            )
    vocab_like = bool(VOCAB_NAME.search(name)) or any(
        (checkpoints[s.ckpt].config or {}).get("vocab_size") == sh[0] for s, sh in zip(every, shapes)
    )
    rows = [sh[0] for sh in shapes]
    odd = next(s for s, sh in zip(every, shapes) if sh != ref_shape)
    if not vocab_like or recipe.vocab_policy == "error":
        ckpt = checkpoints[odd.ckpt]
        hint = (
            "the vocabulary sizes differ: set `vocab_policy: pad` (zero rows for missing tokens) "
            "or `vocab_policy: truncate` (keep the common token-ID prefix) in the recipe"
            if vocab_like
            else "these models do not share an architecture"
        )
        raise MergeError(
            f"model {ckpt.ref!r} ({ckpt.entry(odd.key).path}): tensor {odd.key!r} has "
            f"{checkpoints[odd.ckpt].entry(odd.key).shape[0]} rows but the reference has "
            f"{ref_shape[0]}; {hint}"
        )
    out_rows = max(rows) if recipe.vocab_policy == "pad" else min(rows)
    fixed = [Source(s.ckpt, s.key, r) for s, r in zip(every, rows)]
    new_base = fixed[0] if base else None
    return (out_rows, *ref_shape[1:]), fixed[1:] if base else fixed, new_base


# Units in flight at once: one being read, one computing, one being written.
SLOTS = 3
# Largest unit, in elements, for methods that merge row blocks independently.
ELEMENTWISE_UNIT = 1 << 21


def bytes_per_element(plan: MergePlan) -> tuple[int, int]:
    """(bytes one slot holds per element, scratch a method may add per element).

    A slot holds the stacked inputs, the base and the output in the compute dtype, the cast
    output, and a staging buffer for one raw input. A method working out of place may add
    about one more stacked copy while it computes (one unit at a time).
    """
    cs = element_size(plan.compute_dtype)
    n_models = max((len(t.models) for t in plan.tasks if t.kind == "merge"), default=1)
    out_es = max((element_size(t.out_dtype) for t in plan.tasks), default=1)
    raw_es = max((c.entry(k).dtype.itemsize for c in plan.checkpoints for k in c.keys()), default=1)
    slot = (n_models + 2) * cs + out_es + raw_es
    declared = plan.method.scratch_per_element
    scratch = declared(n_models, plan.compute_dtype) if declared else None
    return slot, (n_models + 1) * cs if scratch is None else scratch


def over_budget(plan: MergePlan) -> bool:
    """A tensor the method cannot split is bigger than the budget's units, and its one-off
    buffer takes the estimated peak past the budget itself."""
    return bool(plan.oversize) and plan.peak_estimate > plan.memory_budget


def budget_that_fits(plan: MergePlan) -> int:
    """The smallest memory budget (to 1%) under which ``plan`` is not ``over_budget``."""
    slot_bytes, scratch = bytes_per_element(plan)
    fixed = plan.method.fixed_scratch(len(plan.model_indices)) if plan.method.fixed_scratch else 0
    numel = max((t.numel for t in plan.tasks if t.name in plan.oversize), default=0)
    # With this budget no tensor is oversize: split_units' capacity rule solved for numel.
    high = (numel * (SLOTS * slot_bytes + scratch) + fixed) * 5 // 4 + 5
    low = plan.memory_budget
    while high - low > max(low // 100, 1):
        mid = (low + high) // 2
        if over_budget(_with_budget(plan, mid)):
            low = mid
        else:
            high = mid
    return high


def _with_budget(plan: MergePlan, memory_budget: int) -> MergePlan:
    trial = replace(plan, memory_budget=memory_budget, units=[], oversize=[], notes=[])
    split_units(trial)
    return trial


def split_units(plan: MergePlan) -> None:
    """Cut tasks into work units so that SLOTS slots plus one unit's scratch fit the budget.

    Tensors of methods that need a whole tensor at once (``splittable`` false) stay whole; if
    one is larger than the budget allows, it is split anyway when the method can get its
    per-tensor numbers from statistics passes (``splittable_with_statistics``), else it is
    listed in ``plan.oversize`` and gets a one-off buffer when its turn comes.
    """
    slot_bytes, scratch = bytes_per_element(plan)
    per_elem = SLOTS * slot_bytes + scratch
    # A fifth of the budget is headroom for what is not a tensor buffer: the allocator's
    # slack, thread stacks, headers and bookkeeping, which the measured peak also contains.
    fixed = plan.method.fixed_scratch(len(plan.model_indices)) if plan.method.fixed_scratch else 0
    # (A budget too small for the fixed scratch still gets a fifth for the buffers.)
    capacity = max(max(plan.memory_budget * 4 // 5 - fixed, plan.memory_budget // 5) // per_elem, 1)
    for task in plan.tasks:
        if task.kind == "copy":
            plan.units.append(WorkUnit(task, None))
            continue
        rows = task.shape[0] if task.shape else 1
        elementwise = plan.method.splittable(task.params)
        can_split = elementwise or plan.method.splittable_with_statistics(task.params)
        # Elementwise methods gain nothing from units bigger than a few million elements, and
        # every byte of slot costs a page fault on first touch: cap their units (a 0.84B linear
        # merge: 5.7-6.7 s with 2M-element units vs 7.0-8.3 s with 10M).
        limit = min(capacity, ELEMENTWISE_UNIT) if elementwise else capacity
        if task.numel <= limit or not task.shape or rows <= 1 or not can_split:
            if task.numel > capacity:
                plan.oversize.append(task.name)
            plan.units.append(WorkUnit(task, None))
            continue
        row_numel = task.numel // rows
        block = max(1, limit // max(row_numel, 1))
        for start in range(0, rows, block):
            stop = min(rows, start + block)
            plan.units.append(WorkUnit(task, (start, stop)))
