"""Packing small tensors for the device: an LLM has thousands of norms, biases and per-layer
vectors, each a few KB, and one kernel launch (plus three stream hand-offs) per tensor would cost
far more than their bytes. Units of an elementwise method with identical parameters are packed
into one flat unit (their elements side by side in one slot) and merged in one launch; each
member is then cast, checked and written on its own.

Only methods that say output element i depends only on input elements i (``splittable``), draw
no random numbers, need no model-wide or per-tensor statistics (``prepare``) and report no
per-tensor numbers (``summarize``) are packed, so a pack's bytes equal the members' merged one
by one (tests/test_device_pipeline.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from weightsmith.engine.reading import Loaded, _read_input, load_unit
from weightsmith.engine.slots import Slot, typed, unit_numel, unit_shape
from weightsmith.engine.tasks import MergePlan, WorkUnit

SMALL_NUMEL = 1 << 16  # elements: 4096-wide norms and biases are far below, matrices far above


@dataclass
class Pack:
    """Small units merged as one flat unit; ``offsets[i]`` is where unit i's elements start."""

    units: list[WorkUnit]
    offsets: list[int] = field(default_factory=list)
    numel: int = 0

    def add(self, unit: WorkUnit) -> None:
        self.offsets.append(self.numel)
        self.units.append(unit)
        self.numel += unit_numel(unit)


def packable(plan: MergePlan, unit: WorkUnit) -> bool:
    task = unit.task
    method = plan.method
    return (
        task.kind == "merge"
        and unit_numel(unit) <= SMALL_NUMEL
        and method.splittable(task.params)
        and not method.uses_randomness
        and method.prepare is None
        and method.summarize is None
        and task.seed is None
        and not task.aux
    )


def _signature(unit: WorkUnit) -> tuple[Any, ...]:
    task = unit.task
    return (
        repr(sorted(task.params.items())), len(task.models), task.base is None, task.out_dtype,
    )


def pack_units(plan: MergePlan, units: list[WorkUnit], capacity: int) -> list[WorkUnit | Pack]:
    """``units`` with the packable ones gathered into packs of at most ``capacity`` elements.
    Others keep their order; a pack goes where it filled up (the writer places every block at
    its own offset, so the order of work does not change the bytes)."""
    out: list[WorkUnit | Pack] = []
    open_packs: dict[tuple[Any, ...], Pack] = {}

    def flush(key: tuple[Any, ...]) -> None:
        pack = open_packs.pop(key)
        out.append(pack.units[0] if len(pack.units) == 1 else pack)

    for unit in units:
        if not packable(plan, unit):
            out.append(unit)
            continue
        key = _signature(unit)
        pack = open_packs.get(key)
        if pack is not None and pack.numel + unit_numel(unit) > capacity:
            flush(key)
            pack = None
        if pack is None:
            pack = open_packs[key] = Pack([])
        pack.add(unit)
    for key in list(open_packs):
        flush(key)
    return out


def load_item(plan: MergePlan, item: WorkUnit | Pack, slot: Slot) -> Loaded:
    """Fill a slot with a unit's inputs, or a pack's side by side (flat, [N, total])."""
    if isinstance(item, WorkUnit):
        return load_unit(plan, item, slot)
    cd = plan.compute_dtype
    first = item.units[0].task
    stacked = typed(slot.stacked, cd, (len(first.models), item.numel))
    base = typed(slot.base, cd, (item.numel,)) if first.base is not None else None
    for unit, start in zip(item.units, item.offsets):
        task, shape, n = unit.task, unit_shape(unit), unit_numel(unit)
        for i, src in enumerate(task.models):
            _read_input(plan, src, unit, stacked[i, start:start + n].view(shape), slot.raw)
        if base is not None:
            assert task.base is not None
            _read_input(plan, task.base, unit, base[start:start + n].view(shape), slot.raw)
    return Loaded(item.units[0], slot, models=stacked, base=base, pack=item)
