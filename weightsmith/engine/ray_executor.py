"""Runs a MergePlan on a Ray cluster: one task per output shard, the local engine inside each.

The driver has laid the shards out (header written, space reserved) in the temporary output
folder, as for a local run. Each Ray task gets the plan by reference (checkpoints pickle as
headers and paths, ``Checkpoint.__getstate__``), opens the inputs itself (shared filesystem or
each node's Hub cache: no tensor travels through the object store), runs the local executor
on the sub-plan of its shard under the plan's memory budget, and ``pwrite``s its blocks at the
offsets the layout fixed. The driver then journals what the workers wrote, and the pipeline
writes side files and renames the folder into place as for a local run.

Model-wide statistics (ties ``scope: model``, LiNeS ``alpha: auto``) are Ray reductions of the
same partials the local engine combines: each pass maps over the shards and the driver
combines in plan order, so the result is the very same number. Integer partials (histograms,
counts, sign sums) are added on the worker, since integer addition does not depend on order;
floating ones come back one per unit, so the driver's float sums round exactly as the local
engine's do. Per-tensor statistics (thresholds of tensors split into row blocks) need only
their own tensor, all of whose blocks are in one shard: each task runs them itself.

Without shared storage for the output (``shared_fs=False``, ``--ray-no-shared-fs``) each task
writes its shard to a node-local file and streams it back to the driver in chunks instead
(engine/ray_stream.py); the driver writes and verifies them, and nothing else changes.

Ray retries a task whose worker dies (``max_retries``); a retry writes the same bytes at the
same offsets, so the output is unchanged. Ray is imported only here, when asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from weightsmith.engine import ray_stream
from weightsmith.engine.device_choice import CPU_STATISTICS, ON_CPU, DeviceChoice
from weightsmith.engine.executor import UnitKey
from weightsmith.engine.partition import ShardWork, sub_plan
from weightsmith.engine.passes import (
    MAX_PASSES,
    prepare_statistics,
    statistic_units,
    unit_bytes,
    unit_partials,
)
from weightsmith.engine.ray_shard import ShardResult, merge_shard
from weightsmith.engine.run_stats import RunStats
from weightsmith.engine.slots import SlotPool
from weightsmith.engine.tasks import MergePlan, WorkUnit
from weightsmith.errors import MergeError, RecipeError
from weightsmith.io.journal import Entry, Journal
from weightsmith.io.writer import ShardWriter
from weightsmith.notices import warn
from weightsmith.ops.statistics import GlobalStatistics
from weightsmith.units import format_size

# A task whose worker process dies is run again this many times before the merge fails.
MAX_RETRIES = 3


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RecipeError(
            "--executor ray needs Ray: pip install 'weightsmith[ray]' (or pip install 'ray>=2.9')"
        ) from None
    return ray


def _exact(part: Any) -> bool:
    """Partials whose sum does not depend on the order of addition: integers only."""
    if part is None or isinstance(part, (bool, int, np.integer)):
        return True
    if isinstance(part, (list, tuple)):
        return all(_exact(p) for p in part)
    if isinstance(part, dict):
        return all(_exact(p) for p in part.values())
    if isinstance(part, torch.Tensor):
        return not (part.dtype.is_floating_point or part.dtype.is_complex)
    if isinstance(part, np.ndarray):
        return part.dtype.kind in "iub"
    return False


def collect_shard(
    plan: MergePlan, indices: list[int], stats: GlobalStatistics, device_choice: DeviceChoice
) -> tuple[bool, list[Any]]:
    """One statistics pass over one shard's units: (reduced, partials). Integer partials are
    reduced here to one; others are returned one per unit, in plan order."""
    part_plan = sub_plan(plan, indices)
    parts = list(
        unit_partials(part_plan, part_plan.units, SlotPool(part_plan), stats, device_choice=device_choice)
    )
    if not all(_exact(p) for p in parts):
        return False, parts
    total: Any = None
    for p in parts:
        total = p if total is None else stats.combine(total, p)
    return True, [total]


def reduce_statistics(
    ray: Any,
    plan: MergePlan,
    plan_ref: Any,
    collect: Any,
    device_choice: DeviceChoice,
    shard_of: dict[str, int],
) -> tuple[Any, int, int] | None:
    """Model-wide statistics as Ray reductions, or None when the method has none (or only
    per-tensor ones, which each shard's task runs itself)."""
    stats = prepare_statistics(plan)
    if stats is None or not stats.count_aliases_once:
        return None
    inner = getattr(stats, "inner", None)
    if inner is not None and not inner.count_aliases_once:
        # Model-wide statistics wrapping per-tensor ones (LiNeS over per-tensor TIES with
        # tensors split into row blocks): the inner thresholds would stay in worker state the
        # driver never reduces. Refuse rather than merge with thresholds that are not there.
        raise MergeError(
            f"`{plan.method.name}` wraps per-tensor statistics ({inner.purpose}) that --executor ray "
            "cannot reduce yet; run this merge with --executor local, or raise --memory-budget so "
            "no tensor is split into row blocks"
        )
    units = statistic_units(plan, stats)
    index = {id(u): i for i, u in enumerate(plan.units)}
    groups: dict[int, list[int]] = {}
    for unit in units:  # alias-free units, grouped by shard, plan order kept within each
        groups.setdefault(shard_of[unit.task.name], []).append(index[id(unit)])
    per_pass = sum(unit_bytes(plan, u) for u in units)
    passes = 0
    while stats.wants_pass():  # (may set the method's phase: ship it after this call)
        passes += 1
        if passes > MAX_PASSES:
            raise MergeError(
                f"`{plan.method.name}` asked for more than {MAX_PASSES} statistics passes; "
                "this is a bug in the method, please report it"
            )
        stats_ref = ray.put(stats)
        results = ray.get(
            [collect.remote(plan_ref, groups[k], stats_ref, device_choice) for k in sorted(groups)]
        )
        total: Any = None
        for _reduced, parts in results:
            for part in parts:
                total = part if total is None else stats.combine(total, part)
        stats.absorb(total)
    return stats.result(), passes, passes * per_pass


BACKPRESSURE = "_generator_backpressure_num_objects"


def streamed_task(ray: Any, options: dict[str, Any]) -> Any:
    """The streamed shard task, holding at most CHUNKS_IN_FLIGHT chunks ahead of the driver.

    Ray (2.60 here) bounds a streaming generator only through the private option
    ``_generator_backpressure_num_objects``. A Ray that drops it refuses the option by name
    (ValueError); the merge then runs unbounded, with a warning, rather than failing: Ray
    spills chunks the driver has not taken yet to disk instead of holding them in memory.
    """
    remote = ray.remote(ray_stream.merge_shard_streamed)
    bounded = {BACKPRESSURE: ray_stream.CHUNKS_IN_FLIGHT}
    try:
        return remote.options(**options, num_returns="streaming", **bounded)
    except ValueError as e:
        if BACKPRESSURE not in str(e):
            raise
    warn(f"this Ray ({getattr(ray, '__version__', '?')}) has no {BACKPRESSURE}: workers may run "
         f"ahead of the writer by more than {ray_stream.CHUNKS_IN_FLIGHT} chunks per shard, and "
         "Ray spills what the object store cannot hold to disk")
    return remote.options(**options, num_returns="streaming")


def _check_nodes_fit(ray: Any, budget: int) -> None:
    """A task asking for more memory than any node offers would wait forever: say so now."""
    largest = max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if largest and budget > largest:
        raise MergeError(
            f"--memory-budget {format_size(budget)} is more than any Ray node offers (largest: "
            f"{format_size(largest)} of schedulable memory); lower the budget or add bigger nodes"
        )


def _shard_groups_by_writer(plan: MergePlan, writer: ShardWriter) -> list[ShardWork]:
    shard_of = {name: slot.shard for name, slot in writer.slots.items()}
    work = [ShardWork(i, name, []) for i, name in enumerate(writer.names)]
    for i, unit in enumerate(plan.units):
        work[shard_of[unit.task.name]].units.append(i)
    for w in work:
        w.bytes_to_write = sum(_unit_out_bytes(plan.units[i]) for i in w.units)
    return [w for w in work if w.units]


def _unit_out_bytes(unit: WorkUnit) -> int:
    task = unit.task
    if unit.rows is None or not task.shape:
        return task.out_bytes
    return task.out_bytes * (unit.rows[1] - unit.rows[0]) // task.shape[0]


def execute_on_ray(
    plan: MergePlan,
    writer: ShardWriter,
    *,
    address: str | None = None,
    shared_fs: bool = True,
    progress: Callable[[int], None] | None = None,
    device_choice: DeviceChoice = ON_CPU,
    journal: Journal | None = None,
    reused: dict[UnitKey, Entry] | None = None,
) -> RunStats:
    """``execute``'s contract, on Ray: every unit written through ``writer``'s layout. The
    statistics passes run on the CPU; ``device_choice`` applies to each task's output pass.
    ``shared_fs=False``: the workers never see ``writer``'s folder; each streams its shard
    back to this process (engine/ray_stream.py)."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    try:
        return _run(ray, plan, writer, progress, device_choice, journal, reused or {}, shared_fs)
    finally:
        if started_here:
            ray.shutdown()


def _run(
    ray: Any,
    plan: MergePlan,
    writer: ShardWriter,
    progress: Callable[[int], None] | None,
    device_choice: DeviceChoice,
    journal: Journal | None,
    reused: dict[UnitKey, Entry],
    shared_fs: bool,
) -> RunStats:
    # Workers need no more than the plan's budget each; Ray schedules by it.
    _check_nodes_fit(ray, plan.memory_budget)
    options = {"max_retries": MAX_RETRIES, "memory": plan.memory_budget}
    collect = ray.remote(collect_shard).options(**options)
    plan_ref = ray.put(plan)
    shard_of = {name: slot.shard for name, slot in writer.slots.items()}
    statistics = reduce_statistics(ray, plan, plan_ref, collect, CPU_STATISTICS, shard_of)
    work = _shard_groups_by_writer(plan, writer)
    pending = {}
    if shared_fs:
        task = ray.remote(merge_shard).options(**options)
    else:  # a generator task: chunks, then the trailer (engine/ray_stream.py)
        task = streamed_task(ray, options)
    for w in work:
        keys = {(plan.units[i].task.name, plan.units[i].rows) for i in w.units}
        mine = {k: e for k, e in reused.items() if k in keys}
        if shared_fs:
            where: tuple[Any, ...] = (str(writer.folder), writer.names, writer.slots)
        else:  # the shard's name, header and slots: nothing that names the output folder
            where = (ray_stream.shard_file(writer, w.shard),)
        args = (plan_ref, w.units, *where, device_choice, statistics, mine)
        kwargs = {} if shared_fs else {"chunk_bytes": ray_stream.CHUNK_BYTES}
        pending[_launch(task, args, kwargs)] = w
    if shared_fs:
        results = _wait_all(ray, pending, progress)
    else:
        results = ray_stream.receive_streams(ray, pending, writer, progress)
    return _gather(plan, writer, journal, statistics, [results[w.shard] for w in work])


def _launch(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Start one shard's task (every argument it gets passes here: tests inspect them)."""
    return task.remote(*args, **kwargs)


def _wait_all(
    ray: Any, pending: dict[Any, ShardWork], progress: Callable[[int], None] | None
) -> dict[int, ShardResult]:
    results: dict[int, ShardResult] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        w = pending.pop(done[0])
        results[w.shard] = ray.get(done[0])
        if progress:
            progress(w.bytes_to_write)
    return results


def _gather(
    plan: MergePlan,
    writer: ShardWriter,
    journal: Journal | None,
    statistics: tuple[Any, int, int] | None,
    results: list[ShardResult],
) -> RunStats:
    """One RunStats for the whole merge, as the local executor would report it."""
    total = RunStats()
    if statistics is not None:
        total.context, total.global_passes, total.global_bytes_read = statistics
    reports: dict[str, dict[str, float]] = {}
    for stats, entries, written in results:
        if statistics is None:  # per-tensor passes ran in every task: each read its own inputs
            total.global_passes = max(total.global_passes, stats.global_passes)
            total.global_bytes_read += stats.global_bytes_read
        total.bytes_written += stats.bytes_written
        total.tensors += stats.tensors
        total.reused_blocks += stats.reused_blocks
        total.reused_bytes += stats.reused_bytes
        reports.update(stats.report)
        for stage, seconds in stats.timings.items():
            total.add_time(stage, seconds)
        for name, nbytes in written.items():
            writer.written[name] = writer.written.get(name, 0) + nbytes
        if journal is not None:
            for entry in entries:
                journal.record(entry)
    # In plan order, as the local executor fills it.
    total.report = {t.name: reports[t.name] for t in plan.tasks if t.name in reports}
    total.bytes_read = plan.bytes_to_read + total.global_bytes_read
    return total
