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

import math
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from weightsmith.engine.passes import run_global_passes
from weightsmith.engine.reading import Loaded, _read_input, stream_loaded
from weightsmith.engine.run_stats import RunStats
from weightsmith.engine.slots import Slot, SlotPool, typed, unit_shape
from weightsmith.engine.tasks import MergePlan, WorkUnit
from weightsmith.errors import MergeError, NonFiniteInput
from weightsmith.io.journal import Entry, Journal
from weightsmith.io.writer import ShardWriter
from weightsmith.ops.registry import MergeInputs


def _libc() -> Any:
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def keep_big_buffers_on_the_heap() -> None:
    """Serve the operators' tensor-sized temporaries from glibc's heap, not fresh mmaps.

    glibc maps each allocation above its threshold anew, and the kernel then zero-fills it a
    page fault per 4 KiB: measured on a 46 MB tensor, clone 44 ms vs 8 ms and a TIES trim 2x
    slower. On the heap, freed buffers are reused by the next tensor; the budget bounds what
    is live at once, and ``release_heap`` hands the memory back after the merge.
    """
    libc = _libc()
    if libc is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)


def release_heap() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _nonfinite_culprit(plan: MergePlan, unit: WorkUnit) -> str:
    """After a NaN/Inf shows up, find which input (if any) already had one."""
    task = unit.task
    shape = unit_shape(unit)
    for src in [*([task.base] if task.base else []), *task.models]:
        ckpt = plan.checkpoints[src.ckpt]
        data = torch.empty(shape, dtype=torch.float64)
        raw = torch.empty(math.prod(shape) * 8, dtype=torch.uint8)
        _read_input(plan, src, unit, data, raw)
        if not torch.isfinite(data).all():
            return (
                f"the input model {ckpt.ref!r} ({ckpt.entry(src.key).path}) already contains "
                "NaN/Inf in this tensor; fix or replace that checkpoint"
            )
    return (
        "no input has NaN/Inf, so the merge arithmetic overflowed; lower the weights or lambda"
    )


UnitKey = tuple[str, "tuple[int, int] | None"]

# Test-only: SIGKILL this process right after the N-th block is journaled, to test --resume the
# way a crash would leave things. Never set it outside the test suite.
KILL_AFTER_ENV = "WEIGHTSMITH_TEST_KILL_AFTER"


def execute(
    plan: MergePlan,
    writer: ShardWriter,
    *,
    progress: Callable[[int], None] | None = None,
    device: str = "cpu",
    journal: Journal | None = None,
    reused: dict[UnitKey, Entry] | None = None,
) -> RunStats:
    """Run every unit of the plan, writing results through ``writer``.

    Units in ``reused`` (verified blocks of an interrupted run) are not computed again; their
    journaled statistics stand in. Every block written is recorded in ``journal``.
    """
    keep_big_buffers_on_the_heap()
    try:
        return _execute(
            plan, writer, progress=progress, device=device, journal=journal, reused=reused or {}
        )
    finally:
        release_heap()


def _execute(
    plan: MergePlan,
    writer: ShardWriter,
    *,
    progress: Callable[[int], None] | None,
    device: str,
    journal: Journal | None,
    reused: dict[UnitKey, Entry],
) -> RunStats:
    stats = RunStats()
    pool = SlotPool(plan)
    # Methods with model-wide statistics stream the inputs first; the result is small. A
    # resumed run computes them again (they read the inputs, never the output).
    stats.context, stats.global_passes, stats.global_bytes_read = run_global_passes(
        plan, pool, device=device
    )
    unit_stats: dict[UnitKey, dict[str, float]] = {key: e.stats for key, e in reused.items() if e.stats}
    if progress and reused:
        progress(sum(e.nbytes for e in reused.values()))
    stats.reused_blocks = len(reused)
    stats.reused_bytes = sum(e.nbytes for e in reused.values())
    to_write: queue.Queue[tuple[WorkUnit, torch.Tensor, Slot, dict[str, float]] | None] = queue.Queue()
    errors: list[BaseException] = []
    aborted = threading.Event()
    kill_after = int(os.environ.get(KILL_AFTER_ENV) or 0)

    def write_behind() -> None:
        journaled = 0
        while True:
            item = to_write.get()
            if item is None:
                return
            unit, out, slot, tensor_stats = item
            try:
                if not errors and not aborted.is_set():
                    started = time.perf_counter()
                    crc = writer.write(unit.task.name, out, unit.rows)
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
                pool.release(slot)

    writer_thread = threading.Thread(target=write_behind, name="ws-write", daemon=True)
    writer_thread.start()
    todo = [u for u in plan.units if (u.task.name, u.rows) not in reused]
    units = stream_loaded(plan, todo, pool, stats)
    try:
        for loaded in units:
            if errors:
                raise errors[0]
            unit = loaded.unit
            if loaded.copy is not None:
                to_write.put((unit, loaded.copy, loaded.slot, {}))
                continue
            try:
                started = time.perf_counter()
                out, tensor_stats = _compute(plan, loaded, device, stats.context)
                stats.add_time("compute", time.perf_counter() - started)
            except BaseException:
                pool.release(loaded.slot)
                raise
            tensor_stats = {k: float(v) for k, v in tensor_stats.items()}  # as journaled
            if tensor_stats:
                unit_stats[(unit.task.name, unit.rows)] = tensor_stats
            to_write.put((unit, out, loaded.slot, tensor_stats))
            stats.tensors += 1
            del loaded
    except BaseException:
        aborted.set()  # the output folder will be removed: skip pending writes
        raise
    finally:
        units.close()
        to_write.put(None)
        writer_thread.join()
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


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. min/max propagate NaN and expose Inf in one fast pass, where
    ``isfinite().all()`` is an order of magnitude slower on the CPU."""
    if t.numel() == 0:
        return True
    if t.dtype.is_floating_point and t.element_size() == 1:
        t = t.float()  # no float8 kernels for aminmax; float8 values are exact in float32
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _check_float8_range(plan: MergePlan, unit: WorkUnit, out: torch.Tensor) -> None:
    task = unit.task
    if not all_finite(out):
        raise MergeError(
            f"tensor {task.name!r}: the merge produced NaN/Inf; {_nonfinite_culprit(plan, unit)}"
        )
    if out.numel() and float(out.abs().max()) > torch.finfo(task.out_dtype).max:
        raise MergeError(
            f"tensor {task.name!r}: values overflow {str(task.out_dtype).removeprefix('torch.')} "
            f"(largest {torch.finfo(task.out_dtype).max:g}); write a wider out_dtype or lower the weights"
        )


def _compute(
    plan: MergePlan, loaded: Loaded, device: str, context: Any = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Run the method on a loaded unit; return the result cast into the slot's buffer."""
    unit, slot = loaded.unit, loaded.slot
    task = unit.task
    assert loaded.models is not None
    models, base = loaded.models, loaded.base
    shape = unit_shape(unit)
    out_buffer = typed(slot.out, plan.compute_dtype, shape)
    aux = loaded.aux
    if device != "cpu":
        models = models.to(device, non_blocking=True)
        base = base.to(device, non_blocking=True) if base is not None else None
        out_buffer = None
        aux = {
            k: [t.to(device) if t is not None else None for t in v]
            if isinstance(v, list)
            else (v.to(device) if v is not None else None)
            for k, v in aux.items()
        }
    generator = None
    if task.seed is not None:
        generator = torch.Generator(device=models.device)
        generator.manual_seed(task.seed)
    refs = tuple(plan.checkpoints[s.ckpt].ref for s in task.models)
    inputs = MergeInputs(
        task.name, models, base, generator, context, out=out_buffer, aux=aux, model_refs=refs
    )
    try:
        out = plan.method(inputs, **task.params)
    except NonFiniteInput:
        culprit = _nonfinite_culprit(plan, unit)
        raise MergeError(f"tensor {task.name!r}: NaN/Inf in the inputs; {culprit}") from None
    cast = typed(slot.cast, task.out_dtype, shape)
    if task.out_dtype.is_floating_point and task.out_dtype.itemsize == 1:
        # torch saturates casts to float8 (Inf and 1e6 both become 448 in e4m3fn), so the
        # check below could not see them: check the range in the compute dtype first.
        _check_float8_range(plan, unit, out)
    cast.copy_(out)
    if task.out_dtype.is_floating_point and not all_finite(cast):
        if not all_finite(out):
            raise MergeError(
                f"tensor {task.name!r}: the merge produced NaN/Inf; {_nonfinite_culprit(plan, unit)}"
            )
        raise MergeError(
            f"tensor {task.name!r}: values overflow {str(task.out_dtype).removeprefix('torch.')}; "
            "write a wider out_dtype or lower the weights"
        )
    return cast, inputs.stats
