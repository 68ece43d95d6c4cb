"""Runs a MergePlan: read-ahead, compute, write-behind, in reusable buffers under one budget.

Three stages overlap: a reader thread ``pread``s the next unit's inputs straight into a slot
of preallocated buffers (converting to the compute dtype there when needed); the calling
thread runs the operator on views of that slot and casts the result into the slot's output
buffer; a writer thread ``pwrite``s it to its place in the shard and frees the slot. A fixed
number of slots, sized by the plan from ``--memory-budget``, bounds memory; reusing them
instead of allocating per tensor avoids a page fault per 4 KiB, which otherwise costs more
than the reads. The engine never knows the operator's math: it hands stacked tensors to
``method(inputs, **params)``.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from weightsmith.engine.compute import all_finite, cast_checked, run_method
from weightsmith.engine.device import DeviceStage, open_stage
from weightsmith.engine.device_choice import CPU_STATISTICS, ON_CPU, DeviceChoice
from weightsmith.engine.device_pipeline import run_on_device
from weightsmith.engine.heap import choose_heap, release_heap
from weightsmith.engine.passes import run_global_passes
from weightsmith.engine.reading import Loaded, stream_loaded
from weightsmith.engine.run_stats import RunStats
from weightsmith.engine.slots import Slot, SlotPool, typed, unit_shape
from weightsmith.engine.tasks import MergePlan, WorkUnit
from weightsmith.io.journal import Entry, Journal
from weightsmith.io.writer import ShardWriter

__all__ = ["RunStats", "all_finite", "execute"]

UnitKey = tuple[str, "tuple[int, int] | None"]

# Test-only: SIGKILL this process right after the N-th block is journaled, to test --resume the
# way a crash would leave things. Never set it outside the test suite.
KILL_AFTER_ENV = "WEIGHTSMITH_TEST_KILL_AFTER"


def execute(
    plan: MergePlan,
    writer: ShardWriter,
    *,
    progress: Callable[[int], None] | None = None,
    device_choice: DeviceChoice = ON_CPU,
    journal: Journal | None = None,
    reused: dict[UnitKey, Entry] | None = None,
    statistics: tuple[Any, int, int] | None = None,
) -> RunStats:
    """Run every unit of the plan, writing results through ``writer``.

    Units in ``reused`` (verified blocks of an interrupted run) are not computed again; their
    journaled statistics stand in. Every block written is recorded in ``journal``. On a
    device other than the CPU (``device_choice``: ``cuda[:N]``, or the ``cpu-staged`` fake)
    the units go through the device pipeline (engine/device_pipeline.py) with its kernels and
    device memory budget (default: four fifths of the device's free memory).
    ``statistics`` (context, passes, bytes read) stands in for the statistics passes when they
    were run elsewhere (a distributed run reduces them over the whole model first).
    """
    choose_heap(plan.method)
    stage = open_stage(device_choice)
    try:
        return _execute(
            plan, writer, progress=progress, journal=journal, reused=reused or {},
            stage=stage, device_choice=device_choice, statistics=statistics,
        )
    finally:
        if stage is not None:
            stage.close()
        release_heap()


def _execute(
    plan: MergePlan,
    writer: ShardWriter,
    *,
    progress: Callable[[int], None] | None,
    journal: Journal | None,
    reused: dict[UnitKey, Entry],
    stage: DeviceStage | None,
    device_choice: DeviceChoice,
    statistics: tuple[Any, int, int] | None = None,
) -> RunStats:
    stats = RunStats()
    pool = SlotPool(plan, alloc=stage.pinned if stage is not None else None)
    # Methods with model-wide statistics stream the inputs first; the result is small. A
    # resumed run computes them again (they read the inputs, never the output). On a stage,
    # on its compute device (``cuda`` resolved to its index; the CPU for the fake).
    passes_on = CPU_STATISTICS if stage is None else replace(device_choice, device=str(stage.compute_device))
    stats.context, stats.global_passes, stats.global_bytes_read = statistics or run_global_passes(
        plan, pool, device_choice=passes_on
    )
    unit_stats: dict[UnitKey, dict[str, float]] = {key: e.stats for key, e in reused.items() if e.stats}
    if progress and reused:
        progress(sum(e.nbytes for e in reused.values()))
    stats.reused_blocks = len(reused)
    stats.reused_bytes = sum(e.nbytes for e in reused.values())
    to_write: queue.Queue[
        tuple[WorkUnit, torch.Tensor, Slot | None, dict[str, float], Callable[[], None] | None] | None
    ] = queue.Queue()
    errors: list[BaseException] = []
    aborted = threading.Event()
    kill_after = int(os.environ.get(KILL_AFTER_ENV) or 0)

    def write_behind() -> None:
        journaled = 0
        while True:
            item = to_write.get()
            if item is None:
                return
            unit, out, slot, tensor_stats, ready = item
            try:
                if ready is not None:  # the device pipeline: wait for the copy out
                    ready()
                if not errors and not aborted.is_set():
                    started = time.perf_counter()
                    crc = writer.write(unit.task.name, out, unit.rows, checksum=journal is not None)
                    stats.add_time("write", time.perf_counter() - started)
                    nbytes = out.numel() * out.element_size()
                    if journal is not None:
                        shard, offset, _ = writer.span(unit.task.name, unit.rows)
                        journal.record(
                            Entry(unit.task.name, unit.rows, writer.names[shard], offset, nbytes, crc,
                                  tensor_stats)
                        )
                        journaled += 1
                        if journaled == kill_after:
                            os.kill(os.getpid(), signal.SIGKILL)
                    stats.bytes_written += nbytes
                    if progress:
                        progress(nbytes)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                errors.append(e)
            finally:
                del out
                if slot is not None:
                    pool.release(slot)

    writer_thread = threading.Thread(target=write_behind, name="ws-write", daemon=True)
    writer_thread.start()
    todo = [u for u in plan.units if (u.task.name, u.rows) not in reused]
    if stage is not None:
        def record(unit: WorkUnit, tensor_stats: dict[str, float]) -> None:
            unit_stats[(unit.task.name, unit.rows)] = tensor_stats

        try:
            run_on_device(plan, todo, pool, stats, stage, device_choice, to_write.put, record, errors)
        except BaseException:
            aborted.set()
            raise
        finally:
            to_write.put(None)
            writer_thread.join()
            stats.device_peak_bytes = stage.peak_bytes()
            stats.device_log = list(getattr(stage, "log", []))
        return _finish(plan, stats, unit_stats, errors)
    units = stream_loaded(plan, todo, pool, stats)
    try:
        for loaded in units:
            if errors:
                raise errors[0]
            unit = loaded.unit
            if loaded.copy is not None:
                to_write.put((unit, loaded.copy, loaded.slot, {}, None))
                continue
            try:
                started = time.perf_counter()
                out, tensor_stats = _compute(plan, loaded, stats.context)
                stats.add_time("compute", time.perf_counter() - started)
            except BaseException:
                pool.release(loaded.slot)
                raise
            tensor_stats = {k: float(v) for k, v in tensor_stats.items()}  # as journaled
            if tensor_stats:
                unit_stats[(unit.task.name, unit.rows)] = tensor_stats
            to_write.put((unit, out, loaded.slot, tensor_stats, None))
            stats.tensors += 1
            del loaded
    except BaseException:
        aborted.set()  # the output folder will be removed: skip pending writes
        raise
    finally:
        units.close()
        to_write.put(None)
        writer_thread.join()
    return _finish(plan, stats, unit_stats, errors)


def _finish(
    plan: MergePlan, stats: RunStats, unit_stats: dict[UnitKey, dict[str, float]], errors: list[BaseException]
) -> RunStats:
    if errors:
        raise errors[0]
    # Row blocks of one tensor add up (methods report additive quantities); summed in plan
    # order, so a resumed run reports exactly what an uninterrupted one does.
    for unit in plan.units:
        tensor_stats = unit_stats.get((unit.task.name, unit.rows))
        if tensor_stats:
            into = stats.report.setdefault(unit.task.name, {})
            for k, v in tensor_stats.items():
                into[k] = into.get(k, 0.0) + v
    stats.bytes_read = plan.bytes_to_read + stats.global_bytes_read
    return stats


def _compute(plan: MergePlan, loaded: Loaded, context: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Run the method on a loaded unit (CPU); return the result cast into the slot's buffer."""
    unit, slot = loaded.unit, loaded.slot
    task = unit.task
    assert loaded.models is not None
    shape = unit_shape(unit)
    out_buffer = typed(slot.out, plan.compute_dtype, shape)
    out, tensor_stats = run_method(
        plan, unit, task.name, loaded.models, loaded.base, out=out_buffer, aux=loaded.aux, context=context
    )
    cast = typed(slot.cast, task.out_dtype, shape)
    cast_checked(plan, unit, out, cast)
    return cast, tensor_stats
