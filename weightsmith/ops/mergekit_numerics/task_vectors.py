"""task_arithmetic, ties, breadcrumbs, breadcrumbs_ties under ``numerics: mergekit``.

mergekit 0.1.5's generalized task arithmetic, step by step in the compute dtype (the recipe's
``dtype``): each delta = model - base; sparsified on its own (ties: keep exactly
k = max(1, int(density * numel)) entries, the first k of torch.argsort(|delta| as float32,
descending); breadcrumbs: sort |delta| ascending and keep positions [n_bot, n_bot + int(density *
numel)) with n_bot = max(0, numel - int(density * numel) - int(gamma * numel))); multiplied by
the weights as a tensor of the compute dtype (so 0.6 is first rounded to bf16); with
consensus, the sign of the dim-0 sum elected and entries of another sign dropped, the divisor
being the agreeing weights' sum (0 -> 1), else the weights' sum (|sum| < 1e-8 -> 1); divided
when ``normalize``, times ``lambda`` when it is not 1, and added to the base.

Ties at the selection threshold are kept or dropped as torch's (unstable, on CPU) argsort and
sort order them, which is what makes the selection exactly mergekit's.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

import weightsmith.ops.breadcrumbs  # noqa: F401 - registers the methods this module varies
import weightsmith.ops.task_arithmetic  # noqa: F401
import weightsmith.ops.ties  # noqa: F401
from weightsmith.errors import RecipeError
from weightsmith.ops.mergekit_numerics.mode import MODE
from weightsmith.ops.registry import MergeInputs, register_numerics

RESCALE_EPS = 1e-7


def keep_top_k(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Exactly k = max(1, int(density * numel)) largest |delta|, ties in argsort's order."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    magnitude = delta.abs().reshape(-1)
    if magnitude.device.type == "cpu":
        magnitude = magnitude.float()  # mergekit sorts float32 magnitudes on the CPU
    mask[torch.argsort(magnitude, descending=True)[:k]] = 1
    return delta * mask.reshape_as(delta)


def keep_band(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the int(gamma * numel) largest and enough of the smallest |delta| to
    keep int(density * numel), by position in torch.sort's ascending order."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    magnitude = delta.abs().reshape(-1)
    if magnitude.device.type == "cpu":
        magnitude = magnitude.float()
    order = torch.sort(magnitude, descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bot : n_bot + target]] = 1
    return delta * mask.reshape_as(delta)


def rescale_l1(original: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale what was kept back to the original L1 norm (skipped when either is tiny)."""
    before = original.abs().sum()
    after = kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def _gta(
    inputs: MergeInputs,
    *,
    sparsify: str | None,
    consensus: bool,
    weight: list[float],
    density: list[float] | None = None,
    gamma: list[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    **params: Any,
) -> torch.Tensor:
    base = inputs.base
    assert base is not None
    scope = params.get("scope", "tensor")
    if scope != "tensor":
        raise RecipeError(
            f"tensor {inputs.name!r}: scope: {scope} has no mergekit counterpart; numerics: mergekit "
            "needs scope: tensor (mergekit's)"
        )
    n = inputs.models.shape[0]
    deltas = base.new_empty((n, *base.shape))
    for i in range(n):
        delta = inputs.models[i] - base
        if sparsify == "magnitude":
            kept = keep_top_k(delta, density[i]) if density else delta
        elif sparsify == "band":
            kept = keep_band(delta, density[i], gamma[i]) if density and gamma else delta
        else:
            kept = delta
        if sparsify is not None and rescale and kept is not delta:
            kept = rescale_l1(delta, kept)
        deltas[i] = kept
    weights = torch.tensor(weight, dtype=deltas.dtype, device=deltas.device)
    weights = weights.reshape(n, *([1] * (deltas.dim() - 1)))
    deltas.mul_(weights)
    if consensus:
        signs = deltas.sign()
        elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        agree = signs == elected
        mixed = (deltas * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    lam = params.get("lambda", 1.0)
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


# Whole tensors: the selection is over the tensor, and mergekit's dim-0 sums are per element.
_WHOLE = {"elementwise": False, "splits_with_statistics": False, "fixed_scratch": None}
_WHOLE_NO_STATS = {**_WHOLE, "scratch_per_element": None}

register_numerics("task_arithmetic", MODE, partial(_gta, sparsify=None, consensus=False))
register_numerics("ties", MODE, partial(_gta, sparsify="magnitude", consensus=True), **_WHOLE_NO_STATS)
register_numerics("breadcrumbs", MODE, partial(_gta, sparsify="band", consensus=False), **_WHOLE_NO_STATS)
register_numerics("breadcrumbs_ties", MODE, partial(_gta, sparsify="band", consensus=True), **_WHOLE_NO_STATS)
