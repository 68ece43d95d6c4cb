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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from weightsmith.engine.plan import SLOTS, MergePlan, Source, WorkUnit
from weightsmith.errors import MergeError, NonFiniteInput
from weightsmith.io.journal import Entry, Journal
from weightsmith.io.safetensors_format import element_size
from weightsmith.io.writer import ShardWriter
from weightsmith.ops.registry import MergeInputs

_POLL = 0.1  # seconds between checks for cancellation while waiting


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


def unit_shape(unit: WorkUnit) -> tuple[int, ...]:
    shape = unit.task.shape
    if unit.rows is None:
        return shape
    return (unit.rows[1] - unit.rows[0], *shape[1:])


def unit_numel(unit: WorkUnit) -> int:
    return math.prod(unit_shape(unit))


@dataclass
class Slot:
    """Byte buffers for one unit in flight; typed views are cut from them per unit."""

    capacity: int  # elements per tensor
    stacked: torch.Tensor  # n_models * capacity compute-dtype elements
    base: torch.Tensor  # capacity compute-dtype elements
    out: torch.Tensor  # capacity compute-dtype elements
    cast: torch.Tensor  # capacity output-dtype elements (widest output dtype)
    raw: torch.Tensor  # staging for inputs that need a dtype conversion
    pooled: bool = True

    @classmethod
    def allocate(cls, capacity: int, n_models: int, cs: int, out_es: int, raw_es: int) -> Slot:
        def buf(nbytes: int) -> torch.Tensor:
            return torch.empty(max(nbytes, 1), dtype=torch.uint8)

        return cls(
            capacity,
            buf(n_models * capacity * cs),
            buf(capacity * cs),
            buf(capacity * cs),
            buf(capacity * out_es),
            buf(capacity * raw_es),
        )


def typed(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A typed view of the front of a uint8 buffer."""
    nbytes = math.prod(shape) * element_size(dtype)
    return buffer[:nbytes].view(dtype).view(shape)


class SlotPool:
    """A fixed set of reusable slots; a unit bigger than a slot gets a one-off slot."""

    def __init__(self, plan: MergePlan, count: int = SLOTS) -> None:
        merge_units = [u for u in plan.units if u.task.kind == "merge"]
        oversize = set(plan.oversize)
        fitting = [unit_numel(u) for u in merge_units if u.task.name not in oversize]
        self.capacity = max(fitting, default=1)
        self.n_models = max((len(u.task.models) for u in merge_units), default=1)
        self.cs = element_size(plan.compute_dtype)
        self.out_es = max((element_size(u.task.out_dtype) for u in plan.units), default=1)
        self.raw_es = max(
            (plan.checkpoints[s.ckpt].entry(s.key).dtype.itemsize for u in plan.units
             for s in [*u.task.models, *([u.task.base] if u.task.base else [])]),
            default=1,
        )
        self.free: queue.Queue[Slot | None] = queue.Queue()
        self.created = 0
        self.count = count

    def _new(self, capacity: int) -> Slot:
        return Slot.allocate(capacity, self.n_models, self.cs, self.out_es, self.raw_es)

    def acquire(self, unit: WorkUnit, cancelled: threading.Event) -> Slot | None:
        need = unit_numel(unit)
        if unit.task.kind == "copy":
            need = math.ceil(unit.task.out_bytes / max(self.raw_es, 1))
        if need > self.capacity:
            slot = self._new(need)  # an oversize tensor the method cannot split
            slot.pooled = False
            return slot
        while not cancelled.is_set():
            if self.created < self.count and self.free.empty():
                self.created += 1
                return self._new(self.capacity)
            try:
                slot = self.free.get(timeout=_POLL)
            except queue.Empty:
                continue
            if slot is not None:
                return slot
        return None

    def release(self, slot: Slot) -> None:
        if slot.pooled:
            self.free.put(slot)


@dataclass
class Loaded:
    unit: WorkUnit
    slot: Slot
    models: torch.Tensor | None = None
    base: torch.Tensor | None = None
    copy: torch.Tensor | None = None
    aux: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunStats:
    bytes_read: int = 0
    bytes_written: int = 0
    tensors: int = 0
    report: dict[str, dict[str, float]] = field(default_factory=dict)
    # Model-wide statistics passes run before the output pass (engine/passes.py), what they
    # read, and their result (handed to the method as ``inputs.context``).
    global_passes: int = 0
    global_bytes_read: int = 0
    context: Any = None
    # merge_report.json's summary (engine/summary.py), filled by the pipeline after the run.
    summary: dict[str, Any] | None = None
    # Blocks (and their bytes) an interrupted run had written and this one verified and kept.
    reused_blocks: int = 0
    reused_bytes: int = 0
    # Busy seconds per stage (they overlap, so their sum can exceed the wall time).
    timings: dict[str, float] = field(default_factory=dict)

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


def _read_input(
    plan: MergePlan, src: Source, unit: WorkUnit, dest: torch.Tensor, raw: torch.Tensor
) -> None:
    """Read one input of a unit into ``dest`` (compute dtype), padding or truncating vocab rows."""
    ckpt = plan.checkpoints[src.ckpt]
    entry = ckpt.entry(src.key)
    rows = unit.rows
    if src.rows is not None:  # vocab_policy: this input has src.rows rows of the output's
        start, stop = rows if rows else (0, unit.task.shape[0])
        have = max(0, min(src.rows, stop) - start)
        if have < stop - start:
            dest[have:].zero_()
        if have == 0:
            return
        rows, dest = (start, start + have), dest[:have]
    if entry.dtype == dest.dtype:
        ckpt.read_into(src.key, dest.reshape(-1).view(torch.uint8), rows)
    else:
        dest.copy_(ckpt.read_into(src.key, raw, rows))


def load_unit(plan: MergePlan, unit: WorkUnit, slot: Slot) -> Loaded:
    """Fill a slot with a unit's inputs; returns views of the slot."""
    task = unit.task
    loaded = Loaded(unit, slot)
    if task.kind == "copy":
        assert task.base is not None
        loaded.copy = plan.checkpoints[task.base.ckpt].read_into(task.base.key, slot.raw, unit.rows)
        return loaded
    cd = plan.compute_dtype
    shape = unit_shape(unit)
    stacked = typed(slot.stacked, cd, (len(task.models), *shape))
    for i, src in enumerate(task.models):
        _read_input(plan, src, unit, stacked[i], slot.raw)
    loaded.models = stacked
    if task.base is not None:
        loaded.base = typed(slot.base, cd, shape)
        _read_input(plan, task.base, unit, loaded.base, slot.raw)
    for name, value in task.aux.items():
        loaded.aux[name] = (
            [_read_aux(plan, src, unit, shape, slot) for src in value]
            if isinstance(value, list)
            else _read_aux(plan, value, unit, shape, slot)
        )
    return loaded


def _read_aux(
    plan: MergePlan, src: Source | None, unit: WorkUnit, shape: tuple[int, ...], slot: Slot
) -> torch.Tensor | None:
    # Checkpoint-valued parameters are rare (transfer, graft): fresh buffers keep slots simple.
    if src is None:
        return None
    dest = torch.empty(shape, dtype=plan.compute_dtype)
    raw_bytes = math.prod(shape) * plan.checkpoints[src.ckpt].entry(src.key).dtype.itemsize
    raw = slot.raw if slot.raw.numel() >= raw_bytes else torch.empty(raw_bytes, dtype=torch.uint8)
    _read_input(plan, src, unit, dest, raw)
    return dest


def stream_loaded(
    plan: MergePlan, units: list[WorkUnit], pool: SlotPool, stats: RunStats | None = None
) -> Iterator[Loaded]:
    """Yield loaded units in order while a reader thread fills the next slots.

    The consumer owns each yielded slot and must ``pool.release`` it when done with it (the
    writer does, for the output pass).
    """
    cancelled = threading.Event()
    ready: queue.Queue[Loaded | BaseException | None] = queue.Queue()

    def produce() -> None:
        try:
            for unit in units:
                slot = pool.acquire(unit, cancelled)
                if slot is None:
                    return
                try:
                    started = time.perf_counter()
                    loaded = load_unit(plan, unit, slot)
                    if stats is not None:
                        stats.add_time("read", time.perf_counter() - started)
                    ready.put(loaded)
                except BaseException:
                    pool.release(slot)
                    raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            ready.put(e)
        finally:
            ready.put(None)

    reader = threading.Thread(target=produce, name="ws-read", daemon=True)
    reader.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
        reader.join()
        while not ready.empty():
            item = ready.get_nowait()
            if isinstance(item, Loaded):
                pool.release(item.slot)


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
    from weightsmith.engine.passes import run_global_passes

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
    inputs = MergeInputs(task.name, models, base, generator, context, out=out_buffer, aux=aux)
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
