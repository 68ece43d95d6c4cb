"""Recipes: the YAML merge users already write (mergekit's format) plus weightsmith's options.

Parameter values resolve exactly as mergekit resolves them: a scalar; a list of numbers
interpolated piecewise-linearly over layer depth t in [0, 1] (a "gradient"; non-numeric lists
pick element floor(t * (n - 1))); or a list of ``{filter: substring, value: ...}`` where the
first entry whose substring occurs in the tensor name wins and an entry without a filter (or
``*``) matches everything. Tensors outside the layer stack (embeddings, final norm, head) are
evaluated at t = 0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from weightsmith.dtype_names import parse_dtype
from weightsmith.errors import RecipeError
from weightsmith.notices import collecting, did_you_mean, lenient, warn
from weightsmith.recipe_refs import _model_ref
from weightsmith.recipe_settings import _check_setting
from weightsmith.recipe_slices import ModuleSpec, SliceSpec, parse_layout, referenced_models
from weightsmith.recipe_tokenizer import _tokenizer_block

# A recipe is a few hundred values; YAML aliases can make a few hundred bytes expand to
# billions of values ("billion laughs"). Refuse past this many values once aliases expand.
MAX_RECIPE_NODES = 100_000

TOP_LEVEL_FIELDS = {
    "merge_method": "name of the merge method (see `weightsmith methods`)",
    "models": "list of {model: PATH_OR_HUB_ID, parameters: {...}}",
    "slices": "instead of models: [{sources: [{model, layer_range: [a, b], parameters}], parameters}]",
    "modules": "instead of models: {MODULE: {slices: ... or models: ..., parameters}}",
    "base_model": "the shared base the fine-tunes started from",
    "parameters": "global method parameters",
    "dtype": "compute dtype hint (weightsmith computes in float32 or wider, unless numerics: mergekit)",
    "out_dtype": "dtype of the written tensors (default: dtype, else the base's)",
    "tokenizer_source": "union, base or a model: the output vocabulary (embedding rows aligned)",
    "tokenizer": "{source: union|base|MODEL, tokens: {TOKEN: {source, force}}, pad_to_multiple_of}",
    "vocab_policy": "error | pad | truncate when vocabulary sizes differ",
    "extra_keys": "error | ignore when an input has tensors the output does not",
    "name": "a name for the merged model (used in the model card)",
    "chat_template": "auto, a named template (alpaca, chatml, llama3, mistral, exaone) or Jinja",
    "evaluation": "held-out data that scores candidate merges: {data: JSONL, task, metric, model} "
    "(soup with mode: greedy)",
    "calibration": "data the input model is run on before the merge: {data: JSONL, task} (antidote)",
    "out_format": "full (a model, the default) | lora (a PEFT adapter of base_model; docs/methods/lora.md)",
    "numerics": "weightsmith (float32 arithmetic, ties at thresholds kept) | mergekit (mergekit "
    "0.1.5's arithmetic in `dtype`, to reproduce its output bit for bit)",
}
# How the arithmetic is done: weightsmith's (float32, every tie at a threshold kept) or
# mergekit 0.1.5's (the recipe's dtype, its operation order, exactly k selected). docs/mergekit.md.
NUMERICS = ("weightsmith", "mergekit")
# Data blocks (evaluation, calibration): the fields each accepts; data and task are required.
DATA_BLOCK_FIELDS = {
    "evaluation": ("data", "task", "metric", "model", "batch_size", "max_length", "truncate"),
    "calibration": ("data", "task", "batch_size", "max_length", "truncate"),
}
UNSUPPORTED_FIELDS: dict[str, str] = {}
MODEL_FIELDS = {"model", "parameters"}
# Fields of a block that recipes sometimes put at the top level, where mergekit ignores them.
NESTED_FIELDS = {
    "pad_to_multiple_of": "the `tokenizer:` block",
    "tokens": "the `tokenizer:` block",
    "layer_range": "a slice's `sources:`",
    "sources": "a `slices:` entry",
}


@dataclass
class ModelSpec:
    ref: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    merge_method: str
    models: list[ModelSpec]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    tokenizer_source: str | None = None
    # The `tokenizer:` block, normalised: {source, tokens: {token: {kind, model, ...}}, pad_to_multiple_of}
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    vocab_policy: str = "error"
    extra_keys: str = "error"
    name: str | None = None
    # Data blocks for methods that run models before merging (validated mappings, or None).
    evaluation: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    text: str | None = None  # the YAML as the user wrote it, comments included
    numerics: str = "weightsmith"  # one of NUMERICS
    out_format: str = "full"  # full | lora (weightsmith/lora_output.py)
    # Under strict, what mergekit silently ignores (unknown fields, parameters the method does
    # not take) is an error; otherwise one warning each, kept here for the plan.
    strict: bool = False
    # The layer-sliced forms (recipe_slices.py); `models` then lists every input they name.
    slices: list[SliceSpec] | None = None
    modules: dict[str, ModuleSpec] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def compute_dtype(self) -> torch.dtype:
        # weightsmith never does arithmetic in 16-bit types, whatever `dtype` says; mergekit's
        # numerics do it in `dtype` (float32 when unset: weightsmith has no per-input dtype).
        if self.numerics == "mergekit" and self.dtype is not None and self.dtype.is_floating_point:
            if self.dtype.itemsize >= 2:
                return self.dtype
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def search_dirs(self) -> tuple[Path, ...]:
        return (self.source.parent,) if self.source else ()

    def data_path(self, value: str) -> Path:
        """A data file named in the recipe: relative to the working directory, else to the
        recipe's folder (as model paths are), so recipes run from anywhere."""
        path = Path(value).expanduser()
        if not path.is_absolute() and not path.exists():
            for folder in self.search_dirs:
                if (folder / path).exists():
                    return folder / path
        return path

    def to_yaml(self) -> str:
        if self.text is not None:
            return self.text
        return yaml.safe_dump(self.raw, sort_keys=False)


def load_recipe(
    source: str | Path | dict[str, Any], *, strict: bool = False, where: str | None = None
) -> Recipe:
    """Load and validate a recipe from a YAML file path, a YAML string or a dict.

    Fields mergekit ignores (an unknown top-level key, a typo) give one warning each, kept in
    ``Recipe.warnings``; ``strict`` makes them errors; ``where`` names the recipe in messages
    (default: its file). A multi-document (multi-stage) recipe
    is refused here: ``weightsmith.merge`` and ``weightsmith.stages`` run those.
    """
    with collecting() as warnings:
        recipe = _load_recipe(source, strict, where)
    recipe.warnings = warnings
    return recipe


def read_recipe_source(source: str | Path) -> tuple[Path | None, str]:
    """The recipe's file (if ``source`` names one) and its text."""
    text = str(source)
    if "\n" not in text and Path(text).exists():
        return Path(text), Path(text).read_text()
    if "\n" not in text and text.endswith((".yaml", ".yml")):
        raise RecipeError(f"recipe file {text!r} does not exist")
    return None, text


def _load_recipe(source: str | Path | dict[str, Any], strict: bool, label: str | None) -> Recipe:
    path: Path | None = None
    text: str | None = None
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        path, text = read_recipe_source(source)
        try:
            raw = yaml.safe_load(text)
        except yaml.composer.ComposerError as e:
            if "single document" not in str(e):
                raise RecipeError(f"{path or 'recipe'}: not valid YAML: {e}") from e
            raise RecipeError(
                f"{path or 'recipe'}: holds several YAML documents (`---`), a multi-stage recipe; "
                "run it with `weightsmith merge` / `weightsmith plan` or weightsmith.merge(), "
                "which run its stages in order"
            ) from None
        except yaml.YAMLError as e:
            raise RecipeError(f"{path or 'recipe'}: not valid YAML: {e}") from e
        except RecursionError:
            raise RecipeError(f"{path or 'recipe'}: nested too deeply to be a recipe") from None
    where = label or (str(path) if path else "recipe")
    check_expanded_size(raw, where)
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a mapping with merge_method, models, ...")
    for key in raw:
        if key in UNSUPPORTED_FIELDS:
            raise RecipeError(f"{where}: `{key}`: {UNSUPPORTED_FIELDS[key]}")
        if key not in TOP_LEVEL_FIELDS:
            lenient(f"{where}: {_unknown_field(key)}", strict)
    method = raw.get("merge_method")
    if not isinstance(method, str):
        raise RecipeError(f"{where}: `merge_method` is required (e.g. merge_method: linear)")
    slices, modules = parse_layout(
        raw,
        where,
        _model_ref,
        lambda value, at: _checked_parameters(value, at, strict),
        lambda value, at: _models(value, at, strict),
    )
    if slices is None and modules is None:
        models = _models(raw.get("models"), where, strict)
    else:
        models = [ModelSpec(ref) for ref in referenced_models(slices, modules)]
    params = _parameters(raw.get("parameters"), f"{where}: parameters")
    base = raw.get("base_model")
    for key in ("name", "tokenizer_source"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], str):
            raise RecipeError(f"{where}: `{key}` must be a string, got {_short(raw[key])}")
    recipe = Recipe(
        merge_method=method,
        models=models,
        base_model=_model_ref(base, f"{where}: base_model") if base is not None else None,
        parameters={k: _check_setting(v, f"{where}: parameters.{k}", strict) for k, v in params.items()},
        dtype=parse_dtype(raw["dtype"], f"{where}: dtype") if "dtype" in raw else None,
        out_dtype=parse_dtype(raw["out_dtype"], f"{where}: out_dtype") if "out_dtype" in raw else None,
        tokenizer_source=raw.get("tokenizer_source"),
        vocab_policy=_choice(raw, "vocab_policy", ("error", "pad", "truncate"), where),
        extra_keys=_choice(raw, "extra_keys", ("error", "ignore"), where),
        name=raw.get("name"),
        evaluation=_data_block(raw, "evaluation", where),
        calibration=_data_block(raw, "calibration", where),
        numerics=_choice(raw, "numerics", NUMERICS, where),
        out_format=_choice(raw, "out_format", ("full", "lora"), where),
        slices=slices,
        modules=modules,
        raw=raw,
        source=path,
        text=text,
        strict=strict,
    )
    recipe.tokenizer = _tokenizer_block(raw, where)
    if recipe.tokenizer is not None:
        recipe.tokenizer_source = recipe.tokenizer["source"]
    chat = raw.get("chat_template")
    if chat is not None and (not isinstance(chat, str) or not chat.strip()):
        raise RecipeError(f"{where}: `chat_template` must be auto, a template name or Jinja text")
    recipe.chat_template = chat
    return recipe


def _unknown_field(key: Any) -> str:
    """What to say about a top-level key that is not a recipe field."""
    text = f"`{key}` is not a recipe field"
    if key in NESTED_FIELDS:
        return f"{text} (it belongs in {NESTED_FIELDS[key]})"
    hint = did_you_mean(str(key), [*TOP_LEVEL_FIELDS, *UNSUPPORTED_FIELDS])
    return text + (hint or " (a method's parameters go under `parameters:`)")


def _models(models_raw: Any, where: str, strict: bool = False) -> list[ModelSpec]:
    if not isinstance(models_raw, list) or not models_raw:
        raise RecipeError(f"{where}: `models` must be a non-empty list of {{model: PATH}} entries")
    models = []
    for i, entry in enumerate(models_raw):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(f"{where}: models[{i}] ({_short(entry)}) needs a `model:` path or Hub id")
        ref = _model_ref(entry["model"], f"{where}: models[{i}].model")
        for key in sorted(set(entry) - MODEL_FIELDS, key=str):
            hint = did_you_mean(str(key), MODEL_FIELDS) or (
                " (an entry has `model` and `parameters`: put parameters under `parameters:`)"
            )
            lenient(f"{where}: models[{i}] ({ref}): `{key}` is not a model entry field{hint}", strict)
        params = _parameters(entry.get("parameters"), f"{where}: models[{i}] ({ref}).parameters")
        checked = {
            k: _check_setting(v, f"{where}: models[{i}] ({ref}).parameters.{k}", strict)
            for k, v in params.items()
        }
        first = next((j for j, m in enumerate(models) if m.ref == ref), None)
        if first is not None:
            # Merged as listed: a repeat is an input like any other (a soup or model_stock of
            # identical fine-tunes is a legitimate test). mergekit 0.1.5 refuses the recipe and
            # earlier versions merged the model once, so say what happens and how to match them.
            warn(f"{where}: models[{i}] ({ref}) repeats models[{first}]: both entries are merged "
                 "(mergekit 0.1.5 refuses this recipe, earlier mergekit merged the model once; "
                 "delete the repeat to get that)")
        models.append(ModelSpec(ref, checked))
    return models


def _checked_parameters(value: Any, where: str, strict: bool = False) -> dict[str, Any]:
    """A ``parameters:`` mapping with every setting checked."""
    return {k: _check_setting(v, f"{where}.{k}", strict) for k, v in _parameters(value, where).items()}


def check_expanded_size(raw: Any, where: str, limit: int = MAX_RECIPE_NODES) -> None:
    """Refuse a recipe with more than ``limit`` values once YAML aliases are expanded.

    PyYAML builds an aliased value once and shares it, so loading is cheap; the expansion
    happens later (printing ``name``, writing the model card). Sizes are counted per shared
    object (memoised by id), so the count itself costs time and memory in the number of
    distinct values, not in the expanded size; a value that contains itself is refused.
    """
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(value: Any) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise RecipeError(f"{where}: a YAML alias refers to a value that contains it")
        in_progress.add(key)
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        total = 1
        for item in items:
            total += size(item)
            if total > limit:
                break  # stop early: the rest cannot make it smaller
        in_progress.discard(key)
        sizes[key] = total
        return total

    try:
        total = size(raw)
    except RecursionError:
        raise RecipeError(f"{where}: nested too deeply to be a recipe") from None
    if total > limit:
        raise RecipeError(
            f"{where}: the recipe expands to more than {limit:,} values (YAML aliases repeating "
            "values, a 'billion laughs'); a merge recipe needs a few hundred: remove the aliases"
        )


def _parameters(value: Any, where: str) -> dict[str, Any]:
    """A ``parameters:`` mapping: parameter names are strings."""
    value = value or {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must be a mapping")
    odd = [k for k in value if not isinstance(k, str)]
    if odd:
        raise RecipeError(f"{where}: parameter names must be strings, got {odd[0]!r}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _data_block(raw: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    """Check the shape of an ``evaluation:`` / ``calibration:`` block; the method checks the rest."""
    block = raw.get(key)
    if block is None:
        return None
    allowed = DATA_BLOCK_FIELDS[key]
    if not isinstance(block, dict):
        raise RecipeError(f"{where}: `{key}` must be a mapping with {', '.join(allowed)}")
    unknown = sorted(set(block) - set(allowed))
    if unknown:
        raise RecipeError(f"{where}: `{key}` has unknown field(s) {unknown}; fields are {', '.join(allowed)}")
    for name in ("data", "task"):
        if not isinstance(block.get(name), str) or not block[name].strip():
            raise RecipeError(f"{where}: `{key}.{name}` is required (a string)")
    for name in ("batch_size", "max_length"):
        value = block.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecipeError(f"{where}: `{key}.{name}` must be a positive integer, got {value!r}")
    for name in ("metric", "model"):
        if name in block and not isinstance(block[name], str):
            raise RecipeError(f"{where}: `{key}.{name}` must be a string, got {block[name]!r}")
    if "truncate" in block and not isinstance(block["truncate"], bool):
        raise RecipeError(f"{where}: `{key}.truncate` must be true or false")
    return dict(block)


def _choice(raw: dict[str, Any], key: str, options: tuple[str, ...], where: str) -> str:
    value = raw.get(key, options[0])
    if not isinstance(value, str) or value not in options:
        raise RecipeError(f"{where}: `{key}` must be one of {', '.join(options)}, got {_short(value)}")
    return value
