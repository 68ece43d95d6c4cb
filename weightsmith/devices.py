"""The device options of ``merge``, ``plan`` and ``extract-lora`` (``--device``, ``--kernels``,
``--device-memory-budget``): checked before any work and turned into the one value the engine
takes (``DeviceChoice``), and what ``plan`` tells about the device pipeline
(engine/device_pipeline.py) from the plan alone."""

from __future__ import annotations

from typing import Any

from weightsmith.engine.device import KERNELS, STAGED_CPU, resolve_device
from weightsmith.engine.device_choice import DeviceChoice
from weightsmith.engine.tasks import MergePlan
from weightsmith.errors import RecipeError
from weightsmith.units import parse_size


def _budget(value: str | int) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise RecipeError(f"device memory budget: {e}") from None


def device_choice(device: str, kernels: str = "torch", budget: str | int | None = None) -> DeviceChoice:
    """The user's device options as the engine takes them: the device checked against the
    kernels (``auto`` resolved, ``check_device``), then the budget parsed to bytes."""
    device = check_device(device, kernels)
    return DeviceChoice(device, kernels, None if budget is None else _budget(budget))


def device_summary(plan: MergePlan, choice: DeviceChoice) -> dict[str, Any]:
    """What ``weightsmith plan --device ...`` tells about the device pipeline, from the plan alone
    (``choice`` from ``device_choice``)."""
    from weightsmith.engine.batching import Pack, pack_units
    from weightsmith.engine.device_pipeline import footprint
    from weightsmith.engine.slots import SlotPool
    from weightsmith.engine.tasks import SLOTS

    if choice.on_cpu:
        return {"device": "cpu"}
    capacity = SlotPool(plan).capacity
    _, sizes, scratch = footprint(plan, plan.units, capacity)
    items = pack_units(plan, plan.units, capacity)
    packs = [i for i in items if isinstance(i, Pack)]
    return {
        "device": choice.device,
        "kernels": choice.kernels,
        "device_memory_budget": choice.memory_budget,
        "device_slot_bytes": sum(sizes),
        "device_scratch_bytes": scratch,
        "device_bytes_for_all_slots": SLOTS * sum(sizes) + scratch,
        "packed_tensors": sum(len(p.units) for p in packs),
        "packed_launches": len(packs),
    }


def check_device(device: str, kernels: str = "torch") -> str:
    """The device to run on (``auto`` resolved), refusing what cannot run here."""
    device = resolve_device(device)
    if kernels not in KERNELS:
        raise RecipeError(f"--kernels {kernels!r}: expected one of {', '.join(KERNELS)}")
    if kernels == "cupy" and device == "cpu":
        raise RecipeError(
            "--kernels cupy runs on a GPU: add --device cuda (or --device auto, where there is one)"
        )
    if kernels == "cupy" and device != STAGED_CPU:
        from weightsmith.ops import cuda_fused

        if not cuda_fused.available() or cuda_fused.simulated():
            raise RecipeError(
                "--kernels cupy: numba.cuda cannot launch kernels on this GPU (install numba-cuda "
                "and a CUDA toolkit's libNVVM, or set CUDA_HOME); use --kernels torch"
            )
    return device
