"""What `weightsmith plan` adds for a ``slices:`` or ``modules:`` merge: which model and layer
each output layer comes from, and each output shard's estimated peak memory (the shard merged
on its own, as one ``--executor ray`` task merges it), so a frankenmerge's memory can be
checked shard by shard before it runs."""

from __future__ import annotations

from typing import Any

from weightsmith.engine.keys import layer_index
from weightsmith.engine.layer_origin import LayerOrigin
from weightsmith.engine.partition import ShardWork, partition
from weightsmith.engine.tasks import MergePlan
from weightsmith.plan_report import describe_tensors, plural
from weightsmith.units import format_size


def origin_line(origin: LayerOrigin) -> str:
    """``layer 3 <- model-a:1 + model-b:2`` (``vision_tower layer 3`` in a multi-module merge)."""
    where = f"{origin.module} " if origin.module not in (None, "default") else ""
    return f"  {where}layer {origin.layer} <- " + " + ".join(f"{ref}:{n}" for ref, n in origin.sources)


def shard_lines(shards: list[ShardWork]) -> list[str]:
    """One line per output shard: its estimated peak, bytes, tensors and which layers."""
    lines = [f"output shards:   {len(shards)}; estimated peak tensor memory merging each one alone:"]
    for w in shards:
        lines.append(
            f"  {w.name}: peak {format_size(w.peak_bytes)}, writes {format_size(w.bytes_to_write)}, "
            f"{plural(len(w.tensors), 'tensor')}: {describe_tensors(w.tensors)}"
        )
    return lines


def sliced_lines(plan: MergePlan, shard_bytes: int | None, per_layer: bool) -> list[str]:
    """The lines after the summary: with ``per_layer`` (``--verbose``) one per output layer
    (the summary's layer map joins runs of layers), then one per output shard unless
    ``shard_bytes`` is None (``--executor ray`` prints its partition, shard by shard)."""
    if not plan.layer_origins:
        return []
    lines = []
    if per_layer:
        lines += ["layers:          one per output layer (output <- model:input layer)"]
        lines += [origin_line(o) for o in plan.layer_origins]
    return lines + (shard_lines(partition(plan, shard_bytes)) if shard_bytes is not None else [])


def layer_map_rows(plan: MergePlan) -> list[dict[str, Any]]:
    """``--json``'s layer map: one row per output layer."""
    return [
        {
            "module": o.module,
            "layer": o.layer,
            "sources": [{"model": ref, "layer": n} for ref, n in o.sources],
        }
        for o in plan.layer_origins
    ]


def sliced_json(plan: MergePlan, shard_bytes: int) -> dict[str, Any]:
    """``--json``'s additions to the summary for a sliced merge (empty for any other)."""
    if not plan.layer_origins:
        return {}
    shards = partition(plan, shard_bytes)
    return {
        "layer_map": layer_map_rows(plan),
        "output_shards": [
            {
                "shard": w.name,
                "tensors": len(w.tensors),
                "bytes_to_write": w.bytes_to_write,
                "estimated_peak_bytes": w.peak_bytes,
                "layers": sorted({n for name in w.tensors if (n := layer_index(name)) is not None}),
            }
            for w in shards
        ],
    }

