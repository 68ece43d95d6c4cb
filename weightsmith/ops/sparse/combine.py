"""The sign-election combine of the sparse task-vector family (TIES, DARE, breadcrumbs).

This is mergekit's "generalized task arithmetic", restated: for each model i the task vector
delta_i = theta_i - theta_0 is sparsified (magnitude top-k, random drop, or a magnitude band),
optionally rescaled, weighted (D_i = w_i * delta_i), then combined:

* with consensus (TIES): elected sign s = +1 where sum_i D_i >= 0 else -1; model i takes part
  at a coordinate iff sign(D_i) == s (zeros never do); merged = sum_i D_i [agree] divided by
  sum_i w_i [agree] when ``normalize`` (a 0 divisor counts as 1);
* without: merged = sum_i D_i, divided by sum_i w_i when ``normalize`` (|sum| < 1e-8 -> 1);

and theta = theta_0 + lambda * merged. Every function here works on one tensor in memory.
Which entries survive is ``selection.py``'s; the report's numbers are ``report.py``'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from weightsmith.errors import RecipeError
from weightsmith.ops import fused, kernel_choice
from weightsmith.ops.registry import MergeInputs, Param
from weightsmith.ops.selection import RadixSelect
from weightsmith.ops.sparse.report import check_finite, record_inputs, record_task_vectors
from weightsmith.ops.sparse.selection import MagnitudeBand, TensorBands, _ranks, band_values, keep_band_


# --------------------------------------------------------------------------- parameters
def common_params(*, normalize: bool, rescale: bool) -> tuple[Param, ...]:
    """Parameters every generalized-task-arithmetic method shares (mergekit's names)."""
    return (
        Param("weight", 1.0, per_model=True, doc="task vector coefficient (mergekit requires it)"),
        Param("density", 1.0, per_model=True, doc="fraction of the task vector kept, in (0, 1]"),
        Param("lambda", 1.0, doc="scale of the merged task vector"),
        Param("normalize", normalize, kind=bool, doc="divide by the sum of (agreeing) weights"),
        Param("rescale", rescale, kind=bool, doc="rescale what survives sparsification"),
        Param("int8_mask", False, kind=bool, doc="accepted for mergekit recipes; no effect here"),
    )


# --------------------------------------------------------------------------- combine
Sparsify = Callable[[int, torch.Tensor], None]


def task_vectors(inputs: MergeInputs) -> torch.Tensor:
    """A fresh [N, ...] tensor of delta_i = theta_i - theta_0 (the inputs stay untouched)."""
    if inputs.base is None:
        raise RecipeError(f"tensor {inputs.name!r}: this method needs a base_model")
    return inputs.models - inputs.base.unsqueeze(0)


def generalized_task_arithmetic(
    inputs: MergeInputs,
    sparsify: Sparsify | None,
    *,
    weight: list[float],
    lam: float,
    normalize: bool,
    consensus: bool,
    bands: Sequence[MagnitudeBand] | None = None,
) -> torch.Tensor:
    """Sparsify each task vector (``sparsify(i, delta_i)`` in place), weight, combine, add base.

    ``bands``, when given, says that ``sparsify`` is exactly a magnitude trim to these bands (one
    per model); the fused kernels then select and trim inside their combine pass instead, and
    a tensor merged in row blocks takes the band values its statistics passes found
    (``TensorBandStatistics``).
    """
    assert inputs.base is not None
    known = inputs.context.get(inputs.name) if isinstance(inputs.context, TensorBands) else None
    k = kernel_choice.pick(inputs.models, inputs.kernels, fused)
    if k is not None:
        return _fused_gta(k, inputs, sparsify, weight, lam, normalize, consensus, bands, known)
    record_inputs(inputs.stats, inputs, None)
    # In place: the engine hands the stacked models over, and a fresh [N, ...] copy would cost
    # a page fault per 4 KiB on every tensor.
    delta = inputs.models.sub_(inputs.base.unsqueeze(0))
    record_task_vectors(inputs.stats, delta)
    check_finite(inputs.stats, inputs.name)
    if known is not None:
        for i, (lo, hi) in enumerate(known):
            keep_band_(delta[i], lo, hi)
    elif sparsify is not None:
        for i in range(delta.shape[0]):
            sparsify(i, delta[i])
    return combine(delta, inputs.base, weight, lam, normalize, consensus, inputs.stats)


def _fused_gta(
    kern: Any,
    inputs: MergeInputs,
    sparsify: Sparsify | None,
    weight: list[float],
    lam: float,
    normalize: bool,
    consensus: bool,
    bands: Sequence[MagnitudeBand] | None,
    known: list[tuple[float, float]] | None,
) -> torch.Tensor:
    """``generalized_task_arithmetic`` in three fused passes (``kern``: ops/fused.py or its CUDA twin)."""
    assert inputs.base is not None
    delta = inputs.models
    # Select here only when the statistics passes have not already found the band values.
    selecting = bands if known is None else None
    ranks = [_ranks(b) for b in selecting] if selecting is not None else [[] for _ in range(len(delta))]
    first = kern.task_vectors_(delta, inputs.base, [bool(r) for r in ranks], inputs.stats)
    check_finite(inputs.stats, inputs.name)
    keep = [(0.0, math.inf)] * delta.shape[0]
    if known is not None:
        keep = list(known)
    elif selecting is None:
        if sparsify is not None:
            for i in range(delta.shape[0]):
                sparsify(i, delta[i])
    else:
        selectors = {(i, k): RadixSelect(torch.float32) for i, rs in enumerate(ranks) for k in rs}
        for (i, k), sel in selectors.items():
            sel.absorb(first[i], k)
        del first  # before the next level's histograms
        second = kern.refine_histograms(delta, [(i, sel.prefix) for (i, _), sel in selectors.items()])
        for sel, counts in zip(selectors.values(), second):
            sel.absorb(counts)
        keep = [band_values(b, lambda k, i=i: selectors[i, k].value) for i, b in enumerate(selecting)]
    return kern.combine_into(
        inputs.output_buffer(), delta, inputs.base, keep, weight, lam, normalize, consensus, inputs.stats
    )


# Coordinates per step of the combine: [N, CHUNK] temporaries of a few MB stay in the
# allocator's cache instead of faulting in fresh tensor-sized pages for every intermediate.
CHUNK = 1 << 18


def combine(
    delta: torch.Tensor,
    base: torch.Tensor,
    weight: list[float],
    lam: float,
    normalize: bool,
    consensus: bool,
    stats: dict[str, float],
) -> torch.Tensor:
    """theta_0 + lambda * (weighted sum of sparsified task vectors, agreeing ones only with
    consensus; divided by the (agreeing) weights when ``normalize``), with report statistics.

    Every output element depends only on its own column of ``delta``, so the work goes chunk by
    chunk over the coordinates; the result does not depend on the chunk size.
    """
    n_models = delta.shape[0]
    flat = delta.reshape(n_models, -1)
    base_flat = base.reshape(-1)
    out = torch.empty_like(base_flat)
    wcol = torch.tensor(weight, dtype=delta.dtype, device=delta.device).unsqueeze(1)
    unit_weights = all(w == 1 for w in weight)
    wsum = sum(weight)
    plain_div = 1.0 if abs(wsum) < 1e-8 else wsum  # mergekit's guard without consensus
    kept = torch.zeros(n_models, dtype=torch.int64, device=delta.device)
    sq_kept = torch.zeros(n_models, dtype=torch.float64, device=delta.device)
    counters = torch.zeros(3, dtype=torch.int64, device=delta.device)  # conflict, active, elected +
    sq_delta = sq_out = 0.0
    for start in range(0, flat.shape[1], CHUNK):
        d = flat[:, start : start + CHUNK]
        # (op choices measured: count_nonzero, amax/amin and a sign product are several times
        # faster on CPU than (d != 0).sum, aminmax and torch.where on boolean stacks)
        kept += torch.count_nonzero(d, dim=1)
        sq_kept += (d * d).sum(1, dtype=torch.float64)
        w = d if unit_weights else d * wcol
        total = w.sum(0)
        any_pos, any_neg = w.amax(0) > 0, w.amin(0) < 0
        active = any_pos | any_neg
        counters[0] += (any_pos & any_neg).sum()
        counters[1] += active.sum()
        if consensus:
            positive = total >= 0
            counters[2] += (positive & active).sum()
            # sign(w_i) == elected sign (+1 where total >= 0, else -1); zeros never agree
            agree = (w * torch.where(positive, 1.0, -1.0)) > 0
            merged = (w * agree).sum(0)
            if normalize:
                divisor = (wcol * agree).sum(0)
                merged.div_(divisor.masked_fill_(divisor == 0, 1))
        else:
            merged = total
            if normalize:
                merged = merged / plain_div
        if lam != 1:
            merged.mul_(lam)
        sq_delta += float(torch.linalg.vector_norm(merged)) ** 2
        res = out[start : start + CHUNK]
        torch.add(base_flat[start : start + CHUNK], merged, out=res)
        sq_out += float(torch.linalg.vector_norm(res)) ** 2
    for i in range(n_models):
        stats[f"kept[{i}]"] = float(kept[i])
        stats[f"sq_kept[{i}]"] = float(sq_kept[i])
    stats["conflict"], stats["active"] = float(counters[0]), float(counters[1])
    if consensus:
        stats["elected_pos"] = float(counters[2])
        stats["elected_neg"] = stats["active"] - stats["elected_pos"]
    stats["sq_delta_out"] = sq_delta
    stats["sq_out"] = sq_out
    return out.reshape(base.shape)


