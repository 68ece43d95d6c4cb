"""Model Breadcrumbs: keep a magnitude band of each task vector, dropping both the small
entries and the largest outliers; ``breadcrumbs_ties`` adds TIES's sign consensus.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024 (arXiv 2312.06795). Parameters as mergekit: ``density`` (per model, fraction kept,
default 1 = no sparsification, in which case gamma is ignored as in mergekit), ``gamma`` (per
model, fraction of the largest |delta| removed, default 0.01), ``weight``, ``lambda``,
``normalize`` (default false), ``rescale`` (L1 norm matching, default false).

``scope``:
* ``tensor`` (default, mergekit): the band is chosen over the whole tensor; when
  density + gamma > 1 fewer outliers are removed so that floor(density n) entries stay.
* ``row`` (the paper's code): per row along the last dimension, remove the floor(gamma d)
  largest and keep the next floor(density d) (fewer at the end of the row); 1-D tensors are
  one row.
Either way the band is by value, so magnitudes tied with a kept entry are kept.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from weightsmith.ops import fused
from weightsmith.ops.param_checks import check_choice, check_density, check_fraction
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, TensorSpec, register
from weightsmith.ops.sparse.band_statistics import (
    TensorBandStatistics,
    band_from_statistics,
    split_tensor_statistics,
)
from weightsmith.ops.sparse.combine import common_params, generalized_task_arithmetic
from weightsmith.ops.sparse.report import summarize
from weightsmith.ops.sparse.rescale import rescale_l1_
from weightsmith.ops.sparse.selection import breadcrumbs_band, trim_band_, trim_band_rows_

SCOPES = ("tensor", "row")


def _breadcrumbs(
    inputs: MergeInputs,
    *,
    consensus: bool,
    weight: list[float],
    density: list[float],
    gamma: list[float],
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
    scope: str = "tensor",
    **params: float,
) -> torch.Tensor:
    """breadcrumbs (``consensus=False``) and breadcrumbs_ties (``consensus=True``)."""
    trim = trim_band_rows_ if scope == "row" else trim_band_

    def sparsify(i: int, delta: torch.Tensor) -> None:
        if density[i] >= 1 and (scope == "tensor" or gamma[i] <= 0):
            return
        l1 = delta.abs().sum() if rescale else None
        trim(delta, density[i], gamma[i])
        if l1 is not None:
            rescale_l1_(delta, l1)

    n = inputs.models[0].numel()
    fusable = scope == "tensor" and not rescale
    return generalized_task_arithmetic(
        inputs,
        sparsify,
        weight=weight,
        lam=params.get("lambda", 1.0),
        normalize=normalize,
        consensus=consensus,
        bands=[breadcrumbs_band(d, g, n) for d, g in zip(density, gamma)] if fusable else None,
    )


breadcrumbs = partial(_breadcrumbs, consensus=False)
breadcrumbs_ties = partial(_breadcrumbs, consensus=True)


def _prepare(name: str):  # noqa: ANN202 - a small closure factory
    def prepare(specs: list[TensorSpec], dtype: torch.dtype) -> TensorBandStatistics | None:
        check_density(specs, name)
        check_choice(specs, "scope", SCOPES, name)
        check_fraction(
            specs, "gamma", name, meaning="the fraction of largest-magnitude entries removed", high_open=True
        )
        return split_tensor_statistics(
            specs,
            dtype,
            lambda spec: [
                breadcrumbs_band(d, g, math.prod(spec.shape))
                for d, g in zip(spec.params["density"], spec.params["gamma"])
            ],
        )

    return prepare


_PARAMS = (
    *common_params(normalize=False, rescale=False),
    Param("gamma", 0.01, per_model=True, doc="fraction of the largest |delta| removed"),
    Param("scope", "tensor", kind=str, doc="tensor (mergekit) | row (the paper's code)"),
)

for _name, _fn, _summary in (
    ("breadcrumbs", breadcrumbs, "keep a magnitude band of each task vector (drop tiny and outliers), add"),
    ("breadcrumbs_ties", breadcrumbs_ties, "breadcrumbs band, then TIES sign election"),
):
    register(
        MergeMethod(
            name=_name,
            fn=_fn,
            params=_PARAMS,
            base="required",
            summary=_summary,
            paper="arXiv:2312.06795",
            elementwise=False,  # the band is chosen over the whole tensor (or whole rows)
            splits_with_statistics=band_from_statistics,
            prepare=_prepare(_name),
            fixed_scratch=lambda n_models: fused.selection_bytes(2 * n_models),  # lo and hi
            scratch_per_element=fused.in_place_scratch,
            summarize=summarize,
        )
    )
