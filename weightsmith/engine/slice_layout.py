"""How a sliced recipe lays out its output: parameter precedence folded into one setting, layer
renaming, where each output layer comes from (the layer map ``weightsmith plan`` shows), and the
output config's per-layer fields."""

from __future__ import annotations

from typing import Any

from weightsmith.engine.keys import LAYER_COUNT_KEYS, LAYER_PATTERN
from weightsmith.engine.layer_origin import LayerOrigin
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.recipe_settings import Conditional
from weightsmith.recipe_slices import SliceSpec

# Config keys that are never per-layer lists, whatever their length.
NOT_PER_LAYER = {"architectures", "auto_map"}
# Where a config keeps a layer count: (sub-config or None for the top level, count keys).
Scopes = tuple[tuple[str | None, tuple[str, ...]], ...]
# A text model's: the top level, or a VLM-style ``text_config``.
DEFAULT_SCOPES: Scopes = (
    (None, LAYER_COUNT_KEYS),
    ("text_config", LAYER_COUNT_KEYS),
)


def chain(*settings: Any) -> Any:
    """One setting equivalent to trying ``settings`` in order (None = absent): the first that
    resolves to a value wins. Only a filter list can resolve to nothing (no filter matches), so
    a scalar or gradient ends the chain, and a filter list gets the rest as a fallback entry."""
    present = [s for s in settings if s is not None]
    if not present:
        return None
    head, rest = present[0], present[1:]
    if not rest or not _is_filters(head):
        return head
    tail = chain(*rest)
    return [*head, *(tail if _is_filters(tail) else [Conditional(None, tail)])]


def _is_filters(setting: Any) -> bool:
    return isinstance(setting, list) and bool(setting) and isinstance(setting[0], Conditional)


def _with_layer(name: str, index: int) -> str:
    """``name`` with its layer number replaced by ``index``."""
    m = LAYER_PATTERN.search(name)
    assert m is not None
    return name[: m.start(1)] + str(index) + name[m.end(1) :]


def slice_origins(slices: list[SliceSpec], module: str | None = None) -> list[LayerOrigin]:
    """One origin per output layer: slices stacked in order, layer ``i`` of a slice from layer
    ``start + i`` of each of its sources."""
    origins: list[LayerOrigin] = []
    for piece in slices:
        for i in range(piece.length):
            sources = tuple((s.ref, s.layer_range[0] + i) for s in piece.sources)
            origins.append(LayerOrigin(module, len(origins), sources))
    return origins


def same_layer_origins(refs: list[str], layers: list[int], module: str | None = None) -> list[LayerOrigin]:
    """A ``models:`` merge's: output layer L from layer L of each of ``refs``."""
    return [LayerOrigin(module, n, tuple((ref, n) for ref in refs)) for n in sorted(set(layers))]


LAYER_MAP_TITLE = "layer map (output <- model:input layers):"


def layer_map(origins: list[LayerOrigin]) -> list[str]:
    """One line per run of output layers that continue the same models' ranges:
    ``0-7 <- model-a:0-7 + model-b:8-15``."""
    runs: list[list[LayerOrigin]] = []
    for origin in origins:
        prev = runs[-1][-1] if runs else None
        if (
            prev is not None
            and prev.module == origin.module
            and origin.layer == prev.layer + 1
            and [r for r, _ in prev.sources] == [r for r, _ in origin.sources]
            and all(n == p + 1 for (_, p), (_, n) in zip(prev.sources, origin.sources))
        ):
            runs[-1].append(origin)
        else:
            runs.append([origin])
    return [
        f"  {_span(run[0].layer, run[-1].layer + 1)} <- "
        + " + ".join(f"{ref}:{_span(a, b + 1)}" for (ref, a), (_, b) in zip(run[0].sources, run[-1].sources))
        for run in runs
    ]


def _span(a: int, b: int) -> str:
    return str(a) if b - a == 1 else f"{a}-{b - 1}"


def config_updates(
    checkpoints: list[Checkpoint],
    ref_index: int,
    layer_sources: list[tuple[int, int]],
    scopes: Scopes = DEFAULT_SCOPES,
) -> dict[str, Any]:
    """The output config's layer count, and its per-layer lists (``layer_types`` and the like:
    any list as long as the stack) rebuilt from each output layer's source model and layer."""
    config = checkpoints[ref_index].config or {}
    updates: dict[str, Any] = {}
    for scope_key, count_keys in scopes:
        scope = config if scope_key is None else config.get(scope_key)
        if not isinstance(scope, dict):
            continue
        changed: dict[str, Any] = {}
        for key in count_keys:
            if isinstance(scope.get(key), int):
                changed[key] = len(layer_sources)
        n_ref = next((scope[k] for k in count_keys if isinstance(scope.get(k), int)), None)
        for key, value in scope.items():
            if key in NOT_PER_LAYER or not isinstance(value, list) or n_ref is None or len(value) != n_ref:
                continue
            rebuilt = []
            for ckpt, layer in layer_sources:
                src_cfg = checkpoints[ckpt].config or {}
                src_scope = src_cfg if scope_key is None else src_cfg.get(scope_key) or {}
                src_list = src_scope.get(key)
                rebuilt.append(
                    src_list[layer]
                    if isinstance(src_list, list) and layer < len(src_list)
                    else value[min(layer, len(value) - 1)]
                )
            changed[key] = rebuilt
        if not changed:
            continue
        if scope_key is None:
            updates.update(changed)
        else:
            updates[scope_key] = {**scope, **changed}
    return updates
