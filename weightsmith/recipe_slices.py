"""``slices:`` and ``modules:`` recipes (mergekit 0.1.5's layer-sliced form), parsed and checked.

A slice stacks ``layer_range[1] - layer_range[0]`` output layers; each of its sources gives
the same number of consecutive layers of one model, merged layer by layer. Parameters resolve
with the precedence slice source > slice > module > global: a scope whose setting is absent,
or whose filters match nothing, falls through to the next (``chain`` folds such a precedence
list into one setting, so the engine's two-level resolver applies unchanged).
``modules:`` maps a module name (``default`` for a text model) to its own ``slices:`` or
``models:`` and ``parameters:``. Nothing here reads a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from weightsmith.errors import RecipeError

SLICE_FIELDS = {"sources", "base_model", "parameters", "residual_weight"}
SOURCE_FIELDS = {"model", "layer_range", "parameters"}
MODULE_FIELDS = {"slices", "models", "parameters"}


@dataclass
class SliceSource:
    ref: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclass
class SliceSpec:
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.sources[0].length


@dataclass
class ModuleSpec:
    """One module of ``modules:``: either slices, or models (kept as raw entries: the recipe
    loader checks them as it checks top-level ``models:``)."""

    name: str
    slices: list[SliceSpec] | None
    models_raw: list[Any] | None
    parameters: dict[str, Any] = field(default_factory=dict)
    models: list[Any] | None = None  # the checked ModelSpecs, filled in by the recipe loader


Checker = Callable[[Any, str], Any]


def parse_slices(value: Any, where: str, model_ref: Checker, parameters: Checker) -> list[SliceSpec]:
    """``slices:`` as written -> SliceSpecs. ``model_ref`` and ``parameters`` are the recipe
    loader's own checks for a model reference and a parameters mapping."""
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{where}: must be a non-empty list of {{sources: [...]}} slices")
    out = []
    for i, raw in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(raw, dict) or "sources" not in raw:
            raise RecipeError(f"{at}: a slice is a mapping with `sources:` (and optional parameters:)")
        _no_unknown(raw, SLICE_FIELDS, at, "a slice has sources, base_model and parameters")
        if raw.get("residual_weight") is not None:
            raise RecipeError(
                f"{at}.residual_weight: not supported (mergekit 0.1.5 ignores it too); remove it"
            )
        sources_raw = raw["sources"]
        if not isinstance(sources_raw, list) or not sources_raw:
            raise RecipeError(f"{at}.sources: must be a non-empty list of {{model, layer_range}}")
        sources = [
            _parse_source(s, f"{at}.sources[{j}]", model_ref, parameters) for j, s in enumerate(sources_raw)
        ]
        lengths = {s.length for s in sources}
        if len(lengths) != 1:
            shown = ", ".join(f"{s.ref} {list(s.layer_range)}" for s in sources)
            raise RecipeError(
                f"{at}: every source of a slice must give the same number of layers; got {shown}"
            )
        base = raw.get("base_model")
        out.append(
            SliceSpec(
                sources,
                model_ref(base, f"{at}.base_model") if base is not None else None,
                parameters(raw.get("parameters"), f"{at}.parameters"),
            )
        )
    return out


def _parse_source(raw: Any, at: str, model_ref: Checker, parameters: Checker) -> SliceSource:
    if not isinstance(raw, dict) or "model" not in raw or "layer_range" not in raw:
        raise RecipeError(f"{at}: a slice source needs `model:` and `layer_range: [start, end]`")
    _no_unknown(raw, SOURCE_FIELDS, at, "a source has model, layer_range and parameters")
    lr = raw["layer_range"]
    if (
        not isinstance(lr, list)
        or len(lr) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in lr)
        or lr[0] < 0
        or lr[1] <= lr[0]
    ):
        raise RecipeError(f"{at}.layer_range: expected [start, end] with 0 <= start < end, got {lr!r}")
    ref = model_ref(raw["model"], f"{at}.model")
    return SliceSource(ref, (lr[0], lr[1]), parameters(raw.get("parameters"), f"{at}.parameters"))


def parse_modules(value: Any, where: str, model_ref: Checker, parameters: Checker) -> dict[str, ModuleSpec]:
    if not isinstance(value, dict) or not value:
        raise RecipeError(
            f"{where}: must map module names (e.g. default) to {{slices: ...}} or {{models: ...}}"
        )
    out = {}
    for name, raw in value.items():
        at = f"{where}.{name}"
        if not isinstance(raw, dict):
            raise RecipeError(f"{at}: a module is a mapping with `slices:` or `models:`")
        _no_unknown(raw, MODULE_FIELDS, at, "a module has slices or models, and parameters")
        if bool(raw.get("slices")) == bool(raw.get("models")):
            raise RecipeError(f"{at}: give exactly one of `slices:` or `models:`")
        slices = (
            parse_slices(raw["slices"], f"{at}.slices", model_ref, parameters) if raw.get("slices") else None
        )
        models = raw.get("models")
        if models is not None and not isinstance(models, list):
            raise RecipeError(f"{at}.models: must be a list of {{model: PATH}} entries")
        out[str(name)] = ModuleSpec(
            str(name), slices, models, parameters(raw.get("parameters"), f"{at}.parameters")
        )
    return out


def _no_unknown(raw: dict[str, Any], allowed: set[str], at: str, hint: str) -> None:
    unknown = sorted(set(raw) - allowed, key=str)
    if unknown:
        raise RecipeError(f"{at}: unknown field(s) {unknown}; {hint}")


def parse_layout(
    raw: dict[str, Any], where: str, model_ref: Checker, parameters: Checker, models: Checker
) -> tuple[list[SliceSpec] | None, dict[str, ModuleSpec] | None]:
    """Exactly one of models, slices, modules (as mergekit); parse the sliced forms. The
    checkers are the recipe loader's (a model reference, a parameters mapping, a models list)."""
    given = [k for k in ("models", "slices", "modules") if raw.get(k)]
    if len(given) > 1:
        raise RecipeError(f"{where}: give exactly one of `models`, `slices` or `modules`; got {given}")
    slices = (
        parse_slices(raw["slices"], f"{where}: slices", model_ref, parameters) if raw.get("slices") else None
    )
    modules = (
        parse_modules(raw["modules"], f"{where}: modules", model_ref, parameters)
        if raw.get("modules")
        else None
    )
    for module in (modules or {}).values():
        if module.models_raw is not None:
            module.models = models(module.models_raw, f"{where}: modules.{module.name}")
    return slices, modules


def referenced_models(slices: list[SliceSpec] | None, modules: dict[str, ModuleSpec] | None) -> list[str]:
    """Every model a sliced recipe names, in order of first mention (the inputs to open)."""
    refs: list[str] = []
    groups = [slices] if slices else []
    for module in (modules or {}).values():
        if module.slices:
            groups.append(module.slices)
        refs += [spec.ref for spec in module.models or []]
    for group in groups:
        for piece in group:
            refs += [s.ref for s in piece.sources] + ([piece.base_model] if piece.base_model else [])
    return list(dict.fromkeys(refs))
