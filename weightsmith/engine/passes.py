"""Global statistics passes: model-wide numbers a method needs before it can write any tensor.

Some methods need a statistic over the whole model (TIES with ``scope: model`` needs, per task,
the k-th largest |delta| over every parameter, then the model-wide majority sign). The inputs
never fit in memory at once, so the engine streams them: before the output pass it runs passes
over the same work units under the same memory budget, and for each unit asks the method for a
small partial statistic (``collect``), reduces the partials (``combine``) and hands the total
back (``absorb``). The method decides after each pass whether it needs another one
(``wants_pass``), since a later statistic may depend on an earlier one. The engine never knows
the math; the method never knows how the inputs were read or split.

Contract for ``collect``: its partials must add up over any split of a tensor into row blocks
and over tensors (histograms, counts, sums), so the total does not depend on the budget.
Tensors that are the same storage (tied embeddings) are visited once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from weightsmith.engine.device_choice import CPU_STATISTICS, DeviceChoice
from weightsmith.engine.keys import TIED_ALIASES
from weightsmith.engine.reading import stream_loaded
from weightsmith.engine.slots import SlotPool
from weightsmith.engine.tasks import MergePlan, WorkUnit
from weightsmith.errors import MergeError
from weightsmith.ops.registry import MergeInputs, TensorSpec
from weightsmith.ops.statistics import GlobalStatistics

# A method asking for more passes than this has a bug (each pass reads the whole model).
MAX_PASSES = 16


def tensor_specs(plan: MergePlan) -> list[TensorSpec]:
    split = {
        u.task.name
        for u in plan.units
        if u.rows is not None and not plan.method.splittable(u.task.params)
    }
    refs = tuple(plan.checkpoints[i].ref for i in plan.model_indices)
    return [
        TensorSpec(t.name, t.shape, t.params, split=t.name in split, models=refs)
        for t in plan.tasks
        if t.kind == "merge"
    ]


def prepare_statistics(plan: MergePlan) -> GlobalStatistics | None:
    """Validate the merge's parameters with the method; return fresh global statistics or None."""
    if plan.method.prepare is None:
        return None
    return plan.method.prepare(tensor_specs(plan), plan.compute_dtype)


def statistic_units(plan: MergePlan, stats: GlobalStatistics | None = None) -> list[WorkUnit]:
    """The merge units each statistics pass visits: every parameter once (or, for statistics
    that do not count aliases once, every unit of each tensor they visit)."""
    if stats is not None and not stats.count_aliases_once:
        return [u for u in plan.units if u.task.kind == "merge" and stats.visits(u.task.name)]
    seen: set[Any] = set()
    tied_to_seen: set[str] = set()
    ref_config = plan.checkpoints[plan.ref_index].config or {}
    tied = bool(ref_config.get("tie_word_embeddings", False))
    units = []
    for unit in plan.units:
        task = unit.task
        if task.kind != "merge":
            continue
        sources = (task.base, tuple(task.models))
        if (sources, unit.rows) in seen:
            continue  # an output key read from the very same inputs (an alias)
        if stats is not None and not stats.visits(task.name):
            continue
        if tied and task.name in tied_to_seen:
            continue  # a tied copy of a tensor already counted (config says the two are one)
        seen.add((sources, unit.rows))
        if tied:
            tied_to_seen.update(TIED_ALIASES.get(task.name, ()))
        units.append(unit)
    return units


def run_global_passes(
    plan: MergePlan, pool: SlotPool, *, device_choice: DeviceChoice = CPU_STATISTICS
) -> tuple[Any, int, int]:
    """Run the method's statistics passes, streaming units through the engine's slots, on
    ``device_choice``'s device (a torch device: ``cuda:N`` or ``cpu``) with its kernels.

    Returns what the output pass gets as ``inputs.context``, the number of passes run and the
    bytes they read.
    """
    stats = prepare_statistics(plan)
    if stats is None:
        return None, 0, 0
    units = statistic_units(plan, stats)
    per_pass = sum(unit_bytes(plan, u) for u in units)
    passes = 0
    while stats.wants_pass():
        passes += 1
        if passes > MAX_PASSES:
            raise MergeError(
                f"`{plan.method.name}` asked for more than {MAX_PASSES} statistics passes; "
                "this is a bug in the method, please report it"
            )
        total: Any = None
        for part in unit_partials(plan, units, pool, stats, device_choice=device_choice):
            total = part if total is None else stats.combine(total, part)
        stats.absorb(total)
    return stats.result(), passes, passes * per_pass


def unit_partials(
    plan: MergePlan,
    units: list[WorkUnit],
    pool: SlotPool,
    stats: GlobalStatistics,
    *,
    device_choice: DeviceChoice = CPU_STATISTICS,
) -> Iterator[Any]:
    """One statistics pass over ``units``: each unit's partial (``collect``), in order. A
    distributed run streams the units of one output shard per worker through this too."""
    stream = stream_loaded(plan, units, pool)
    try:
        for loaded in stream:
            unit = loaded.unit
            try:
                models, base = loaded.models, loaded.base
                assert models is not None
                if device_choice.on_gpu:  # (the cpu-staged fake computes on the CPU)
                    device = device_choice.device
                    models = models.to(device, non_blocking=True)
                    base = base.to(device, non_blocking=True) if base is not None else None
                kernels = device_choice.kernels
                inputs = MergeInputs(unit.task.name, models, base, aux=loaded.aux, kernels=kernels)
                part = stats.collect(inputs, **unit.task.params)
            finally:
                pool.release(loaded.slot)
            del inputs, models, base, loaded
            yield part
    finally:
        stream.close()


def unit_bytes(plan: MergePlan, unit: WorkUnit) -> int:
    task = unit.task
    total = 0
    for src in [*task.models, *([task.base] if task.base else [])]:
        nbytes = plan.checkpoints[src.ckpt].entry(src.key).nbytes
        if unit.rows is not None and task.shape:
            nbytes = nbytes * (unit.rows[1] - unit.rows[0]) // max(task.shape[0], 1)
        total += nbytes
    return total


def describe(stats: GlobalStatistics | None) -> str | None:
    """One line for ``weightsmith plan`` about the extra passes, or None."""
    if stats is None or not stats.wants_pass():
        return None
    n = stats.planned_passes
    return (
        f"{n} streamed statistics pass{'es' if n != 1 else ''} over the inputs before the output "
        f"pass ({stats.purpose})"
    )


__all__ = [
    "GlobalStatistics",
    "describe",
    "prepare_statistics",
    "run_global_passes",
    "statistic_units",
    "tensor_specs",
    "unit_bytes",
    "unit_partials",
]
