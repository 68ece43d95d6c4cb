"""sce, ram, ramplus_tl, arcee_fusion, nearswap under ``numerics: mergekit``.

Each is mergekit 0.1.5's sequence of tensor operations in the compute dtype, with torch's type
promotion where mergekit mixes dtypes:

* sce: variance across the task vectors (population), k = int(count_nonzero(var) * select_topk)
  computed as a float32 tensor product, exactly k by torch.topk; per-model weights
  mean(tau^2) / their sum (a Python float); TIES sign election; sum of weighted kept entries
  over the sum of the kept weights clamped at 1e-6.
* ram / ramplus_tl: entries with |tau| > epsilon count; unique entries are kept, shared ones
  averaged over their count. ramplus_tl's per-model boost is a float32 tensor, so mergekit's
  result (and what it writes without ``out_dtype``) is float32: ``result_dtype`` says so.
* arcee_fusion: softmaxes, +1e-8 and the KL in the compute dtype; quantiles by sorting (the
  element at int(q * (n - 1)), q as float32); the keep mask is float32, so the result is
  float32 too. mergekit samples 1M importances with replacement for bigger tensors from torch's
  global generator: not reproducible, so such tensors take the exact quantiles (and may differ).
* nearswap: weight = clamp(t / clamp(|a - b|, 1e-6), 0, 1); weight * b + (1 - weight) * a
  (``t / x`` is torch's reciprocal-then-multiply, as in mergekit).
"""

from __future__ import annotations

import torch

import weightsmith.ops.arcee_fusion  # noqa: F401 - registers the methods this module varies
import weightsmith.ops.nearswap  # noqa: F401
import weightsmith.ops.ram  # noqa: F401
import weightsmith.ops.sce  # noqa: F401
from weightsmith.ops.mergekit_numerics.mode import MODE
from weightsmith.ops.registry import MergeInputs, register_numerics

PROB_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)


def _task_vectors(inputs: MergeInputs) -> torch.Tensor:
    assert inputs.base is not None
    return torch.stack([m - inputs.base for m in inputs.models], dim=0)


def _elected(tv: torch.Tensor) -> torch.Tensor:
    """TIES' sign election over dim 0 (sum): True where an entry has the elected sign."""
    elected = (tv.sum(dim=0) >= 0).to(tv.dtype) * 2 - 1
    return tv.sign() == elected


def sce(inputs: MergeInputs, select_topk: float = 1.0, int8_mask: bool = False) -> torch.Tensor:
    base = inputs.base
    assert base is not None
    tv = _task_vectors(inputs)
    if select_topk < 1:
        if select_topk <= 0:
            mask = torch.zeros_like(tv[0])
        else:
            var = torch.var(tv, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * select_topk)
            mask = torch.zeros_like(var)
            if k:
                mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tv = tv * mask.unsqueeze(0)
    agree = _elected(tv)
    weights = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    weights = weights.reshape(-1, *([1] * (tv.dim() - 1)))
    erased = weights * agree
    merged = (tv * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def _ram_masks(tv: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, ...]:
    flat = tv.reshape(tv.shape[0], -1)
    nonzero = flat.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return flat, nonzero, counts, counts > 1, counts == 1


def ram(inputs: MergeInputs, epsilon: float = 1e-5) -> torch.Tensor:
    assert inputs.base is not None
    flat, nonzero, counts, shared, unique = _ram_masks(_task_vectors(inputs), epsilon)
    kept = flat * nonzero
    merged = ((kept * unique) + (kept * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return inputs.base + merged.reshape_as(inputs.base)


def ramplus_tl(
    inputs: MergeInputs, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> torch.Tensor:
    assert inputs.base is not None
    flat, nonzero, counts, shared, unique = _ram_masks(_task_vectors(inputs), epsilon)
    rho = (nonzero & shared).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    kept = flat * nonzero
    merged = ((kept * unique * boost.unsqueeze(-1)) + (kept * shared / counts.clamp(min=1))).sum(
        dim=0, keepdim=True
    )
    return inputs.base + merged.reshape_as(inputs.base)


def arcee_fusion(inputs: MergeInputs) -> torch.Tensor:
    a = inputs.base
    assert a is not None
    b = inputs.models[0]
    diff = (b - a).abs()
    p = torch.softmax(b, dim=-1) + PROB_EPS
    q = torch.softmax(a, dim=-1) + PROB_EPS
    importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered = torch.sort(importance.reshape(-1)).values
    at = (torch.tensor(QUANTILES) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    inputs.stats["numel"] = float(a.numel())
    inputs.stats["fused"] = float(mask.sum())
    return a + (b - a) * mask


def nearswap(inputs: MergeInputs, t: float) -> torch.Tensor:
    a = inputs.base
    assert a is not None
    b = inputs.models[0]
    weight = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def _with_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


register_numerics("sce", MODE, sce)
register_numerics("ram", MODE, ram)
register_numerics("ramplus_tl", MODE, ramplus_tl, result_dtype=_with_float32)
register_numerics("arcee_fusion", MODE, arcee_fusion, result_dtype=_with_float32)
register_numerics("nearswap", MODE, nearswap)
