"""The slot engine's three stages on a device (``--device cuda``, or the ``cpu-staged`` fake).

The reader thread ``pread``s a unit into a pinned host slot as on the CPU; then, per unit k,
on three streams of the device stage (``device.py``):

    h2d stream:      copy unit k's inputs into a free device slot        -> event in[k]
    compute stream:  wait in[k]; the method on the device views; cast    -> event done[k]
    d2h stream:      wait done[k]; copy the cast result into the host slot -> event out[k]

The calling thread only enqueues, so the copy in of unit k+1, the compute of unit k and the
copy out of unit k-1 overlap; the writer thread waits for out[k], frees the device slot and
``pwrite``s the host slot as on the CPU. Device slots are preallocated once and reused (no
allocator traffic across streams); their number (at most three) is what ``--device-memory-budget``
allows after one unit's operator scratch. Small tensors of elementwise methods go in packs
(``batching.py``), one launch for many.

The engine passes ``--kernels`` through ``MergeInputs.kernels``; which kernels run is the
operator's choice (``ops/kernel_choice.py``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.engine.batching import Pack, load_item, pack_units
from weightsmith.engine.compute import cast_checked, run_method
from weightsmith.engine.device import DeviceStage
from weightsmith.engine.device_choice import DeviceChoice
from weightsmith.engine.reading import stream_loaded
from weightsmith.engine.run_stats import RunStats
from weightsmith.engine.slots import SlotPool, typed, unit_numel, unit_shape
from weightsmith.engine.tasks import SLOTS, MergePlan, WorkUnit, bytes_per_element
from weightsmith.errors import MergeError
from weightsmith.io.safetensors_format import element_size
from weightsmith.units import format_size

# What the writer gets per unit: (unit, host result, host slot to free or None, stats, ready)
Put = Callable[[tuple[WorkUnit, torch.Tensor, Any, dict[str, float], Callable[[], None] | None]], None]


@dataclass
class DeviceSlot:
    stacked: torch.Tensor
    base: torch.Tensor
    out: torch.Tensor
    cast: torch.Tensor


class DeviceSlots:
    """At most SLOTS device slots of the biggest unit, under the device memory budget."""

    def __init__(self, stage: DeviceStage, plan: MergePlan, units: list[WorkUnit], capacity: int) -> None:
        merge_units = [u for u in units if u.task.kind == "merge"]
        self.capacity, self.sizes, self.scratch = footprint(plan, units, capacity)
        self.slot_bytes = slot_bytes = sum(self.sizes)
        room = stage.budget - self.scratch
        self.count = min(SLOTS, max(room, 0) // slot_bytes)
        if self.count < 1:
            biggest = max(merge_units, key=unit_numel).task.name if merge_units else "?"
            raise MergeError(
                f"--device-memory-budget {format_size(stage.budget)} is too small for tensor "
                f"{biggest!r}: one unit needs {format_size(slot_bytes + self.scratch)} on the device "
                f"(inputs, output and the method's scratch); raise --device-memory-budget, or lower "
                "--memory-budget so that tensors are merged in smaller row blocks"
            )
        self.free: queue.Queue[DeviceSlot] = queue.Queue()
        for _ in range(self.count):
            self.free.put(DeviceSlot(*(stage.empty(s) for s in self.sizes)))

    def acquire(self, failed: list[BaseException]) -> DeviceSlot | None:
        while not failed:
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def release(self, slot: DeviceSlot) -> None:
        self.free.put(slot)


def footprint(plan: MergePlan, units: list[WorkUnit], capacity: int) -> tuple[int, tuple[int, ...], int]:
    """(elements per device slot, the slot's buffer sizes, one unit's scratch) for ``units``:
    slots hold the biggest unit (a host slot's ``capacity``, or an oversize tensor's)."""
    merge_units = [u for u in units if u.task.kind == "merge"]
    cap = max([capacity, *(unit_numel(u) for u in merge_units)])
    n_models = max((len(u.task.models) for u in merge_units), default=1)
    cs = element_size(plan.compute_dtype)
    out_es = max((element_size(u.task.out_dtype) for u in merge_units), default=1)
    sizes = (n_models * cap * cs, cap * cs, cap * cs, cap * out_es)  # stacked, base, out, cast
    return cap, tuple(max(s, 1) for s in sizes), scratch_bytes(plan, cap, merge_units)


def scratch_bytes(plan: MergePlan, numel: int, units: list[WorkUnit]) -> int:
    """The method's working memory for one unit of ``numel`` elements, as the plan counts it,
    plus checkpoint-valued parameters' tensors (moved to the device per unit)."""
    _, per_element = bytes_per_element(plan)
    fixed = plan.method.fixed_scratch(len(plan.model_indices)) if plan.method.fixed_scratch else 0
    aux = max(
        (sum(len(v) if isinstance(v, list) else 1 for v in u.task.aux.values()) for u in units), default=0
    )
    return per_element * numel + fixed + aux * numel * element_size(plan.compute_dtype)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value.to(device) if value is not None else None


def run_on_device(
    plan: MergePlan,
    todo: list[WorkUnit],
    pool: SlotPool,
    stats: RunStats,
    stage: DeviceStage,
    device_choice: DeviceChoice,
    put: Put,
    record: Callable[[WorkUnit, dict[str, float]], None],
    failed: list[BaseException],
) -> None:
    """Run ``todo`` through the device stage (opened for ``device_choice``, whose kernels the
    operators get); hand each result to ``put`` (the writer)."""
    kernels = device_choice.kernels
    items = pack_units(plan, todo, pool.capacity)
    slots = DeviceSlots(stage, plan, todo, pool.capacity)
    stats.device_slots, stats.device_budget = slots.count, stage.budget
    stats.packed_units = sum(len(i.units) for i in items if isinstance(i, Pack))
    stats.packs = sum(1 for i in items if isinstance(i, Pack))
    h2d, compute, d2h = stage.stream("h2d"), stage.stream("compute"), stage.stream("d2h")
    cd, device = plan.compute_dtype, stage.compute_device
    loaded_units = stream_loaded(plan, items, pool, stats, load=load_item)
    # One unit of lag: unit k's copy in is issued before unit k-1's compute, so the copy runs
    # while the compute does (on CUDA the issuing thread waits inside a compute for its checks).
    pending: Callable[[], None] | None = None
    try:
        for index, loaded in enumerate(loaded_units):
            if failed:
                pool.release(loaded.slot)
                raise failed[0]
            if loaded.copy is not None:
                put((loaded.unit, loaded.copy, loaded.slot, {}, None))
                continue
            if pending is not None and slots.count == 1:  # the pending unit holds the only slot
                pending()
                pending = None
            dslot = slots.acquire(failed)
            if dslot is None:
                pool.release(loaded.slot)
                raise failed[0]
            pack: Pack | None = loaded.pack
            members = list(zip(pack.units, pack.offsets)) if pack else [(loaded.unit, 0)]
            unit, host_models, host_base = loaded.unit, loaded.models, loaded.base
            assert host_models is not None
            numel = host_models[0].numel()
            shape = (numel,) if pack else unit_shape(unit)
            out_dtype = unit.task.out_dtype
            models = typed(dslot.stacked, cd, tuple(host_models.shape))
            base = typed(dslot.base, cd, tuple(host_base.shape)) if host_base is not None else None
            dcast = typed(dslot.cast, out_dtype, (numel,))
            host_cast = typed(loaded.slot.cast, out_dtype, (numel,))
            holder: dict[str, float] = {}

            def copy_in(models=models, base=base, host_models=host_models, host_base=host_base) -> None:
                models.copy_(host_models, non_blocking=True)
                if base is not None:
                    base.copy_(host_base, non_blocking=True)

            def run(unit=unit, models=models, base=base, loaded=loaded, members=members, holder=holder,
                    dslot=dslot, dcast=dcast, shape=shape, pack=pack) -> None:
                name = unit.task.name if pack is None else f"{unit.task.name} (+{len(members) - 1} packed)"
                out, tensor_stats = run_method(
                    plan, unit, name, models, base, out=typed(dslot.out, cd, shape),
                    aux=_to(loaded.aux, device), context=stats.context, kernels=kernels,
                )
                flat = out.reshape(-1)
                for member, start in members:
                    n = unit_numel(member)
                    part = unit_shape(member)
                    span = slice(start, start + n)
                    cast_checked(plan, member, flat[span].view(part), dcast[span].view(part))
                holder.update(tensor_stats)

            def copy_out(host_cast=host_cast, dcast=dcast) -> None:
                host_cast.copy_(dcast, non_blocking=True)

            arrived = stage.enqueue(h2d, "h2d", index, copy_in)

            def finish(index=index, arrived=arrived, run=run, copy_out=copy_out, unit=unit, numel=numel,
                       dslot=dslot, holder=holder, pack=pack, members=members, host_cast=host_cast,
                       host_slot=loaded.slot) -> None:
                stage.wait(compute, arrived)
                scratch = scratch_bytes(plan, numel, [unit])
                computed = stage.enqueue(compute, "compute", index, run, scratch=scratch)
                stage.wait(d2h, computed)
                left = stage.enqueue(d2h, "d2h", index, copy_out)
                ready = _ready(stage, left, slots, dslot, holder, unit if pack is None else None, record)
                for i, (member, start) in enumerate(members):
                    n = unit_numel(member)
                    last = i == len(members) - 1
                    put((member, host_cast[start:start + n].view(unit_shape(member)),
                         host_slot if last else None, holder, ready))
                stats.tensors += len(members)

            if pending is not None:
                pending()
            pending = finish
            del loaded
        if pending is not None:
            pending()
            pending = None
    finally:
        loaded_units.close()


def _ready(
    stage: DeviceStage,
    event: Any,
    slots: DeviceSlots,
    dslot: DeviceSlot,
    holder: dict[str, float],
    unit: WorkUnit | None,
    record: Callable[[WorkUnit, dict[str, float]], None],
) -> Callable[[], None]:
    """What the writer calls before writing a unit (or each member of a pack): wait for the copy
    out, free the device slot, take the method's statistics (once)."""
    lock = threading.Lock()
    state: dict[str, Any] = {"done": False}

    def ready() -> None:
        with lock:
            if state["done"]:
                return
            state["done"] = True
            try:
                stage.sync(event)
            finally:
                slots.release(dslot)
            holder.update({k: float(v) for k, v in holder.items()})  # as journaled
            if holder and unit is None:
                raise MergeError(
                    "a pack of small tensors reported per-tensor statistics; this is a bug, please report it"
                )
            if holder and unit is not None:
                record(unit, holder)

    return ready
