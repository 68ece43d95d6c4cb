"""One unit's computation, shared by the CPU executor and the device pipeline: call the method
on views the engine owns, then cast into the output buffer with the range and NaN/Inf checks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from weightsmith.dtype_names import dtype_name
from weightsmith.engine.reading import _read_input
from weightsmith.engine.slots import unit_shape
from weightsmith.engine.tasks import MergePlan, WorkUnit
from weightsmith.errors import MergeError, NonFiniteInput
from weightsmith.ops.registry import MergeInputs


def nonfinite_culprit(plan: MergePlan, unit: WorkUnit) -> str:
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
            f"tensor {task.name!r}: the merge produced NaN/Inf; {nonfinite_culprit(plan, unit)}"
        )
    if out.numel() and float(out.abs().max()) > torch.finfo(task.out_dtype).max:
        raise MergeError(
            f"tensor {task.name!r}: values overflow {dtype_name(task.out_dtype)} "
            f"(largest {torch.finfo(task.out_dtype).max:g}); write a wider out_dtype or lower the weights"
        )


def run_method(
    plan: MergePlan,
    unit: WorkUnit,
    name: str,
    models: torch.Tensor,
    base: torch.Tensor | None,
    *,
    out: torch.Tensor | None,
    aux: dict[str, Any],
    context: Any = None,
    kernels: str = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The method's result for ``models``/``base`` (views the engine hands over for good)."""
    task = unit.task
    generator = None
    if task.seed is not None:
        generator = torch.Generator(device=models.device)
        generator.manual_seed(task.seed)
    refs = tuple(plan.checkpoints[s.ckpt].ref for s in task.models)
    inputs = MergeInputs(
        name, models, base, generator, context, out=out, aux=aux, kernels=kernels, model_refs=refs
    )
    try:
        result = plan.method(inputs, **task.params)
    except NonFiniteInput:
        culprit = nonfinite_culprit(plan, unit)
        raise MergeError(f"tensor {task.name!r}: NaN/Inf in the inputs; {culprit}") from None
    return result, inputs.stats


def cast_checked(plan: MergePlan, unit: WorkUnit, out: torch.Tensor, cast: torch.Tensor) -> None:
    """``cast.copy_(out)`` into the output dtype, refusing NaN/Inf and out-of-range values."""
    task = unit.task
    if task.out_dtype.is_floating_point and task.out_dtype.itemsize == 1:
        # torch saturates casts to float8 (Inf and 1e6 both become 448 in e4m3fn), so the
        # check below could not see them: check the range in the compute dtype first.
        _check_float8_range(plan, unit, out)
    cast.copy_(out)
    if task.out_dtype.is_floating_point and not all_finite(cast):
        if not all_finite(out):
            raise MergeError(
                f"tensor {task.name!r}: the merge produced NaN/Inf; {nonfinite_culprit(plan, unit)}"
            )
        raise MergeError(
            f"tensor {task.name!r}: values overflow {dtype_name(task.out_dtype)}; "
            "write a wider out_dtype or lower the weights"
        )
