"""A plan split by output shard, for a distributed run (``--executor ray``).

The header-first writer lays every shard out from the plan alone (``io.writer.shard_groups``),
so which tensors share a shard, and where each byte goes, is known before any work. One task
per shard then reads its own inputs and writes its own file; no two tasks touch the same bytes.
Plain data and pure functions: ``weightsmith plan --executor ray`` prints this without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from weightsmith.engine.tasks import MergePlan, aux_sources
from weightsmith.io.writer import shard_groups, shard_names
from weightsmith.units import format_size


@dataclass
class ShardWork:
    """The work of one output shard: its file, and the indices of its units in ``plan.units``."""

    shard: int
    name: str
    tensors: list[str]
    units: list[int] = field(default_factory=list)
    bytes_to_read: int = 0
    bytes_to_write: int = 0
    # The estimated peak tensor memory of merging this shard's units alone (one Ray task's).
    peak_bytes: int = 0


def output_layout(plan: MergePlan) -> list[tuple]:
    """What the writer lays out: (name, dtype, shape) per output tensor, in plan order."""
    return [(t.name, t.out_dtype, t.shape) for t in plan.tasks]


def partition(plan: MergePlan, shard_bytes: int) -> list[ShardWork]:
    """Units grouped by the output shard their tensor lands in, in plan order within each."""
    groups = shard_groups(output_layout(plan), shard_bytes)
    names = shard_names(len(groups))
    work = [ShardWork(i, names[i], [name for name, _, _ in group]) for i, group in enumerate(groups)]
    shard_of = {name: i for i, group in enumerate(groups) for name, _, _ in group}
    for task in plan.tasks:
        shard = work[shard_of[task.name]]
        shard.bytes_to_write += task.out_bytes
        for src in [*task.models, *([task.base] if task.base else []), *aux_sources(task)]:
            if task.kind == "copy" and src is not task.base:
                continue
            shard.bytes_to_read += plan.checkpoints[src.ckpt].entry(src.key).nbytes
    for i, unit in enumerate(plan.units):
        work[shard_of[unit.task.name]].units.append(i)
    for w in work:
        w.peak_bytes = sub_plan(plan, w.units).peak_estimate if w.units else 0
    return work


def sub_plan(plan: MergePlan, indices: list[int]) -> MergePlan:
    """The plan restricted to some of its units (one shard's), tasks in plan order."""
    units = [plan.units[i] for i in indices]
    tasks, seen = [], set()
    for unit in units:
        if id(unit.task) not in seen:
            seen.add(id(unit.task))
            tasks.append(unit.task)
    return replace(plan, tasks=tasks, units=units, notes=[])


def partition_rows(work: list[ShardWork], streamed: bool = False) -> list[dict[str, Any]]:
    """``weightsmith plan --executor ray --json``: one row per Ray task; ``bytes_streamed``: what
    it sends back to the driver (``streamed``: --ray-no-shared-fs; its header, a few KB, aside)."""
    return [
        {"task": w.shard, "shard": w.name, "tensors": len(w.tensors), "units": len(w.units),
         "bytes_to_read": w.bytes_to_read, "bytes_to_write": w.bytes_to_write,
         "estimated_peak_bytes": w.peak_bytes, "bytes_streamed": w.bytes_to_write if streamed else 0}
        for w in work
    ]


def describe_partition(work: list[ShardWork], streamed: bool = False) -> list[str]:
    """Lines for ``weightsmith plan --executor ray``: one Ray task per shard and its bytes;
    ``streamed`` (--ray-no-shared-fs): each shard also crosses the object store to the driver."""
    lines = [f"ray partition: {len(work)} task(s), one per output shard"]
    for w in work:
        lines.append(
            f"  task {w.shard}: {w.name}  {len(w.tensors)} tensors, {len(w.units)} units, "
            f"reads {format_size(w.bytes_to_read)}, writes {format_size(w.bytes_to_write)}, "
            f"peak {format_size(w.peak_bytes)}"
            + (f", streams {format_size(w.bytes_to_write)} back" if streamed else "")
        )
    if streamed:
        total = sum(w.bytes_to_write for w in work)
        lines.append(
            f"  no shared filesystem for OUT: shards come back streamed to this process, "
            f"{format_size(total)} through Ray's object store in all (the output's size, plus "
            "each shard's header)"
        )
    return lines
