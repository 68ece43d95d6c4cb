"""Task arithmetic: add, negate and combine task vectors tau_i = theta_i - theta_0.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv 2212.04089).
theta = theta_0 + lambda * sum_i w_i * tau_i (divided by sum_i w_i when ``normalize``).
A negative ``weight`` negates a task (forgetting); analogies are weights +1, +1, -1.
Parameters: ``weight`` (per model, required), ``lambda`` (default 1), ``normalize`` (default
false, as in mergekit).
"""

from __future__ import annotations

import math

import torch

from weightsmith.errors import MergeError
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, per_model_column, register


def summarize_norms(totals: dict[str, float], refs: list[str], context: object = None) -> dict[str, object]:
    """merge_report.json's summary: each task vector's L2 norm over the merged tensors, and
    the norm of the change the merge made to the base."""
    models = [
        {"model": ref, "task_vector_norm": math.sqrt(totals[f"sq_tv[{i}]"])}
        for i, ref in enumerate(refs)
        if f"sq_tv[{i}]" in totals
    ]
    out: dict[str, object] = {"coordinates": int(totals.get("numel", 0)), "models": models}
    lines = [f"  |task vector| of {m['model']}: {m['task_vector_norm']:.4g}" for m in models]
    if "sq_delta_out" in totals:
        out["merged_delta_norm"] = math.sqrt(totals["sq_delta_out"])
        lines.append(f"  |output - base|: {out['merged_delta_norm']:.4g}")
    out["lines"] = lines
    return out


def task_vectors(inputs: MergeInputs) -> torch.Tensor:
    """The stacked task vectors tau_i = model_i - base (a new tensor; inputs untouched)."""
    assert inputs.base is not None
    return inputs.models - inputs.base.unsqueeze(0)


def task_vectors_(inputs: MergeInputs) -> torch.Tensor:
    """The stacked task vectors, computed in place over ``inputs.models`` (no copy)."""
    assert inputs.base is not None
    return inputs.models.sub_(inputs.base.unsqueeze(0))


def task_arithmetic(
    inputs: MergeInputs, weight: list[float], normalize: bool = False, **params: float
) -> torch.Tensor:
    # density, rescale and int8_mask are accepted, unused, as mergekit accepts them here:
    # recipes copied from TIES configs run unchanged.
    lam = params.get("lambda", 1.0)
    assert inputs.base is not None
    tau = task_vectors_(inputs)
    record_task_vector_norms(inputs.stats, tau)
    # Same operation order as mergekit (weight each delta, sum, scale, add the base), so
    # float32 results match bit for bit; done in place to avoid full-size temporaries. The
    # first weighted delta is written straight into the output buffer (the same products as
    # weighting in place and copying, one pass fewer).
    column = per_model_column(weight, tau)
    merged = torch.mul(tau[0], column[0], out=inputs.output_buffer())
    tau[1:].mul_(column[1:])
    # Sequential adds give the same bits as tau.sum(0) (checked in tests) at several times
    # the speed of torch's dim-0 reduction on the CPU.
    for i in range(1, tau.shape[0]):
        merged.add_(tau[i])
    if normalize:
        total = sum(weight)
        if total == 0:
            raise MergeError(
                f"tensor {inputs.name!r}: task weights sum to 0, so normalize cannot divide by "
                "them; set normalize: false (the usual choice for task arithmetic)"
            )
        merged.div_(total)
    if lam != 1.0:  # x * 1.0 is x for every finite and infinite x: skip a full pass
        merged.mul_(lam)
    inputs.stats["sq_delta_out"] = squared_norm(merged)  # |output - base|, before the base is added
    return merged.add_(inputs.base)


def record_task_vector_norms(stats: dict[str, float], tau: torch.Tensor) -> None:
    """Cheap, additive numbers for merge_report.json's per_tensor: each task vector's squared
    L2 norm (one read pass per model; the report's summary takes the square roots)."""
    stats["numel"] = float(tau[0].numel())
    for i in range(tau.shape[0]):
        stats[f"sq_tv[{i}]"] = squared_norm(tau[i])


def squared_norm(x: torch.Tensor) -> float:
    # The norm in the compute dtype, squared in double, so sums over row blocks stay additive.
    return float(torch.linalg.vector_norm(x)) ** 2 if x.numel() else 0.0


register(
    MergeMethod(
        name="task_arithmetic",
        fn=task_arithmetic,
        params=(
            Param("weight", per_model=True, doc="task vector coefficient; negative negates"),
            Param("lambda", 1.0, doc="global scale of the summed task vector"),
            Param("normalize", False, kind=bool, doc="divide by the sum of weights"),
            Param("density", 1.0, per_model=True, doc="accepted for mergekit recipes; unused", ignored=True),
            Param("rescale", False, kind=bool, doc="accepted for mergekit recipes; unused", ignored=True),
            Param("int8_mask", False, kind=bool, doc="accepted for mergekit recipes; unused", ignored=True),
        ),
        base="required",
        summary="base + lambda * sum_i weight_i * (model_i - base)",
        paper="arXiv:2212.04089",
        summarize=summarize_norms,
    )
)
