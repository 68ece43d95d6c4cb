"""Which fused kernel module an operator calls for one tensor: by the device its inputs live on
and the engine's ``--kernels`` choice (``MergeInputs.kernels``).

- inputs on the CPU: the numba CPU kernels (``ops.fused``) where they apply, whatever the
  choice (the CPU path is the one every device is checked against);
- inputs on a CUDA device: ``kernels="torch"`` runs the torch path there (the reference);
  ``"cupy"`` the numba.cuda kernels (``ops.cuda_fused``) on the device buffers where they
  apply, else the torch path; ``"auto"`` (an API caller's default) the torch path, as before
  ``--kernels`` existed.

The engine only passes the choice through; the operators own the decision.
"""

from __future__ import annotations

from typing import Any

import torch

KERNELS = ("torch", "cupy")


def pick(models: torch.Tensor, kernels: str, cpu_kernels: Any) -> Any | None:
    """The kernel module for this [N, ...] stack, or None for the torch path.

    ``cpu_kernels`` is the caller's own ``fused`` module attribute (tests route it elsewhere).
    """
    on_cpu = models.device.type == "cpu"
    if kernels == "torch" and not on_cpu:
        return None
    if cpu_kernels.usable(models):
        return cpu_kernels
    if not on_cpu and kernels == "cupy":
        from weightsmith.ops import cuda_fused

        if cuda_fused.usable(models):
            return cuda_fused
    return None


def for_statistics(models: torch.Tensor, kernels: str, cpu_kernels: Any) -> Any | None:
    """The kernel module for a streamed histogram pass over row blocks: every block of a tensor
    must take the same route whatever its size (the counts accumulate in one place), so no size
    threshold here; None for the torch path."""
    if models.dtype != torch.float32:
        return None
    if models.device.type == "cpu":
        return cpu_kernels if cpu_kernels.available() else None
    if kernels != "cupy":
        return None
    from weightsmith.ops import cuda_fused

    return cuda_fused if cuda_fused.available() and not cuda_fused.simulated() else None
