"""Read-ahead: a reader thread ``pread``s each unit's inputs straight into a free slot
(converting to the compute dtype there when needed) while the consumer works on the previous
one. Both the statistics passes and the output pass stream their units through here.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from weightsmith.engine.run_stats import RunStats
from weightsmith.engine.slots import Slot, SlotPool, typed, unit_shape
from weightsmith.engine.tasks import MergePlan, Source, WorkUnit


@dataclass
class Loaded:
    unit: WorkUnit
    slot: Slot
    models: torch.Tensor | None = None
    base: torch.Tensor | None = None
    copy: torch.Tensor | None = None
    aux: dict[str, Any] = field(default_factory=dict)
    pack: Any = None  # a ``batching.Pack`` when this slot holds several small units


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
    plan: MergePlan,
    units: list[Any],
    pool: SlotPool,
    stats: RunStats | None = None,
    load: Callable[[MergePlan, Any, Slot], Loaded] = load_unit,
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
                    loaded = load(plan, unit, slot)
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
