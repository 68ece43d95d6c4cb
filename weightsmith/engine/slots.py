"""Slots: preallocated buffers for the units in flight, reused from unit to unit.

Reusing a fixed set of byte buffers instead of allocating per tensor avoids a page fault per
4 KiB, which otherwise costs more than the reads; typed views are cut from them per unit.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from weightsmith.engine.tasks import SLOTS, MergePlan, WorkUnit
from weightsmith.io.safetensors_format import element_size

_POLL = 0.1  # seconds between checks for cancellation while waiting


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
    def allocate(
        cls, capacity: int, n_models: int, cs: int, out_es: int, raw_es: int,
        alloc: Callable[[int], torch.Tensor] | None = None,
    ) -> Slot:
        def buf(nbytes: int) -> torch.Tensor:
            if alloc is not None:  # the device pipeline's pinned host memory
                return alloc(nbytes)
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

    def __init__(
        self, plan: MergePlan, count: int = SLOTS, alloc: Callable[[int], torch.Tensor] | None = None
    ) -> None:
        self.alloc = alloc
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
        return Slot.allocate(capacity, self.n_models, self.cs, self.out_es, self.raw_es, self.alloc)

    def acquire(self, unit: WorkUnit, cancelled: threading.Event) -> Slot | None:
        """A free slot for ``unit`` (or for a ``batching.Pack``: anything with ``numel``)."""
        if not isinstance(unit, WorkUnit):
            need = unit.numel
        else:
            need = unit_numel(unit)
        if isinstance(unit, WorkUnit) and unit.task.kind == "copy":
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
