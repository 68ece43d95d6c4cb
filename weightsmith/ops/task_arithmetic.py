"""Task arithmetic: add, negate and combine task vectors tau_i = theta_i - theta_0.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv 2212.04089).
theta = theta_0 + lambda * sum_i w_i * tau_i (divided by sum_i w_i when ``normalize``).
A negative ``weight`` negates a task (forgetting); analogies are weights +1, +1, -1.
Parameters: ``weight`` (per model, required), ``lambda`` (default 1), ``normalize`` (default
false, as in mergekit).
"""

from __future__ import annotations

import torch

from weightsmith.errors import MergeError
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, per_model_column, register


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
    # Same operation order as mergekit (weight each delta, sum, scale, add the base), so
    # float32 results match bit for bit; done in place to avoid full-size temporaries.
    tau.mul_(per_model_column(weight, tau))
    # Sequential adds give the same bits as tau.sum(0) (checked in tests) at several times
    # the speed of torch's dim-0 reduction on the CPU.
    merged = inputs.output_buffer().copy_(tau[0])
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
    return merged.mul_(lam).add_(inputs.base)


register(
    MergeMethod(
        name="task_arithmetic",
        fn=task_arithmetic,
        params=(
            Param("weight", per_model=True, doc="task vector coefficient; negative negates"),
            Param("lambda", 1.0, doc="global scale of the summed task vector"),
            Param("normalize", False, kind=bool, doc="divide by the sum of weights"),
            Param("density", 1.0, per_model=True, doc="accepted for mergekit recipes; unused"),
            Param("rescale", False, kind=bool, doc="accepted for mergekit recipes; unused"),
            Param("int8_mask", False, kind=bool, doc="accepted for mergekit recipes; unused"),
        ),
        base="required",
        summary="base + lambda * sum_i weight_i * (model_i - base)",
        paper="arXiv:2212.04089",
    )
)
