"""TIES-merging: trim each task vector, elect a sign per coordinate, average the agreeing ones.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
(arXiv 2306.01708). Two scopes (``parameters: {scope: tensor | model}``):

``tensor`` (default): mergekit's ``ties``, so mergekit recipes give mergekit's numbers. Per
tensor and model, keep the k = max(1, floor(density n)) largest |delta_i| (here: every entry
with |delta_i| >= the k-th largest, i.e. ties at the threshold are kept, where mergekit keeps
exactly k in arbitrary order); D_i = weight_i * trimmed delta_i; elected sign s = sign(sum D_i)
with 0 -> +1; merged = sum D_i [sign D_i == s] / sum weight_i [sign D_i == s] (``normalize``,
default true; 0 -> 1); theta = theta_0 + lambda merged. ``rescale: true`` matches the L1 norm
of each trimmed task vector to the untrimmed one (mergekit's rescale).

``model``: the paper's reference code. Per task, the threshold is over ALL floating parameters
of the task vector at once (tied tensors once): |delta_i| >= the m-th smallest |delta_i| with
m = D - floor(D density) (density 1: no trimming). T_i = weight_i * trimmed delta_i (weights
default 1, as the paper has none); gamma = sign(sum_i T_i), and coordinates with gamma = 0 take
the model-wide majority sign sign(sum over all coordinates of gamma); model i is selected where
gamma > 0 and T_i > 0, or gamma <= 0 and T_i < 0 (the reference's rule); ``aggregation``
dis-mean (default: mean of the selected), dis-sum (their sum) or dis-max (largest selected
|T_i|, signed by gamma); theta = theta_0 + lambda merged. The thresholds and the majority sign
come from streamed statistics passes over the whole model (engine/passes.py): two histogram
passes (four for float64) find the thresholds exactly, one more sums the elected signs, then the
output pass writes the merge; memory stays within the budget throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.errors import MergeError, RecipeError
from weightsmith.ops import fused, kernel_choice
from weightsmith.ops.param_checks import check_choice, check_density, check_uniform
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, TensorSpec, register
from weightsmith.ops.selection import RadixSelect
from weightsmith.ops.sparse.band_statistics import band_from_statistics, split_tensor_statistics
from weightsmith.ops.sparse.combine import common_params, generalized_task_arithmetic, task_vectors
from weightsmith.ops.sparse.report import check_finite, record_inputs, record_output, record_signs, summarize
from weightsmith.ops.sparse.rescale import rescale_l1_
from weightsmith.ops.sparse.selection import MagnitudeBand, magnitude_band, trim_magnitude_
from weightsmith.ops.statistics import GlobalStatistics

SCOPES = ("tensor", "model")
AGGREGATIONS = ("dis-mean", "dis-sum", "dis-max")


@dataclass(frozen=True)
class TiesModelContext:
    """What the model-scope statistics passes found; the output pass applies it."""

    thresholds: tuple[float | None, ...]  # per task; None = density 1, nothing trimmed
    majority_sign: int  # sign of the sum of elected signs over the whole model: -1, 0 or 1
    parameters: int  # D, floating parameters per task vector (tied tensors once)


def ties(
    inputs: MergeInputs,
    weight: list[float],
    density: list[float],
    normalize: bool = True,
    rescale: bool = False,
    int8_mask: bool = False,
    scope: str = "tensor",
    aggregation: str = "dis-mean",
    **params: float,
) -> torch.Tensor:
    lam = params.get("lambda", 1.0)
    if scope == "model":
        if not isinstance(inputs.context, TiesModelContext):
            raise MergeError(
                f"tensor {inputs.name!r}: ties scope: model needs the model-wide statistics "
                "passes; run it through the merge engine (weightsmith merge / merge())"
            )
        return _apply_model_scope(inputs, inputs.context, weight, lam, aggregation)

    def sparsify(i: int, delta: torch.Tensor) -> None:
        l1 = delta.abs().sum() if rescale and density[i] < 1 else None
        trim_magnitude_(delta, density[i])
        if l1 is not None:
            rescale_l1_(delta, l1)

    n = inputs.models[0].numel()
    return generalized_task_arithmetic(
        inputs,
        sparsify,
        weight=weight,
        lam=lam,
        normalize=normalize,
        consensus=True,
        bands=None if rescale else [magnitude_band(d, n) for d in density],
    )


# --------------------------------------------------------------------------- scope: model
def _trimmed_weighted(
    inputs: MergeInputs, thresholds: tuple[float | None, ...], weight: list[float]
) -> torch.Tensor:
    delta = task_vectors(inputs)
    for i, thr in enumerate(thresholds):
        if thr is not None:
            delta[i].masked_fill_(delta[i].abs() < thr, 0)
    return delta


def _zero_for_none(thresholds: tuple[float | None, ...]) -> list[float]:
    return [0.0 if t is None else t for t in thresholds]


def _elected_signs(weighted: torch.Tensor) -> torch.Tensor:
    # Sequential sum: the same per-element order in the statistics pass and the output pass.
    total = weighted[0].clone()
    for i in range(1, weighted.shape[0]):
        total.add_(weighted[i])
    return torch.sign(total)


def _weigh_(delta: torch.Tensor, weight: list[float]) -> None:
    for i, w in enumerate(weight):
        if w != 1:
            delta[i].mul_(w)


def _apply_model_scope(
    inputs: MergeInputs, ctx: TiesModelContext, weight: list[float], lam: float, aggregation: str
) -> torch.Tensor:
    assert inputs.base is not None
    stats = inputs.stats
    k = kernel_choice.pick(inputs.models, inputs.kernels, fused)
    if k is not None:
        k.task_vectors_(inputs.models, inputs.base, [False] * len(inputs.models), stats)
        check_finite(stats, inputs.name)
        return k.ties_model_combine_into(
            inputs.output_buffer(), inputs.models, inputs.base, _zero_for_none(ctx.thresholds),
            weight, ctx.majority_sign, aggregation, lam, stats,
        )
    delta = _trimmed_weighted(inputs, ctx.thresholds, weight)
    record_inputs(stats, inputs, task_vectors(inputs))
    check_finite(stats, inputs.name)
    for i in range(delta.shape[0]):
        stats[f"kept[{i}]"] = float(torch.count_nonzero(delta[i]))
        stats[f"sq_kept[{i}]"] = float(torch.linalg.vector_norm(delta[i])) ** 2
    _weigh_(delta, weight)
    gamma = _elected_signs(delta)
    gamma.masked_fill_(gamma == 0, float(ctx.majority_sign))
    positive = gamma > 0
    record_signs(stats, delta, positive)
    merged = torch.zeros_like(gamma)
    count = torch.zeros_like(gamma)
    for i in range(delta.shape[0]):
        # The reference selects T_i > 0 where gamma > 0 and T_i < 0 otherwise (gamma <= 0).
        selected = torch.where(positive, delta[i] > 0, delta[i] < 0)
        if aggregation == "dis-max":
            torch.maximum(merged, delta[i].abs() * selected, out=merged)
        else:
            merged.add_(delta[i] * selected)
            count.add_(selected)
    if aggregation == "dis-mean":
        merged.div_(count.clamp_(min=1))
    elif aggregation == "dis-max":
        merged.mul_(gamma)
    if lam != 1:
        merged.mul_(lam)
    out = merged.add_(inputs.base)
    record_output(stats, inputs, out)
    return out


class TiesModelStatistics(GlobalStatistics):
    """Per-task global thresholds (radix selection passes), then the majority sign (one pass)."""

    def __init__(self, densities: list[float], dtype: torch.dtype) -> None:
        self.densities = densities
        self.selectors = [RadixSelect(dtype) if d < 1 else None for d in densities]
        self.thresholds: list[float | None] = [None] * len(densities)
        self.majority: int | None = None
        self.parameters = 0
        levels = next((s.levels for s in self.selectors if s is not None), 0)
        self.planned_passes = levels + 1

    def _selecting(self) -> bool:
        return any(s is not None and not s.done for s in self.selectors)

    def wants_pass(self) -> bool:
        return self._selecting() or self.majority is None

    def collect(self, inputs: MergeInputs, **params: Any) -> Any:
        k = kernel_choice.pick(inputs.models, inputs.kernels, fused)
        if k is not None:
            return self._collect_fused(inputs, params["weight"], k)
        delta = task_vectors(inputs)
        if self._selecting():
            # Counts of magnitudes per task (and D, for the first level's rank).
            return [
                s.counts(delta[i]) if s is not None else None for i, s in enumerate(self.selectors)
            ] + [delta[0].numel()]
        for i, thr in enumerate(self.thresholds):
            if thr is not None:
                delta[i].masked_fill_(delta[i].abs() < thr, 0)
        _weigh_(delta, params["weight"])
        # An exact integer: sum of elected signs (+1, -1, 0) over this block's coordinates.
        return int(_elected_signs(delta).sum(dtype=torch.int64))

    def _collect_fused(self, inputs: MergeInputs, weight: list[float], k: Any) -> Any:
        assert inputs.base is not None
        delta = inputs.models  # the engine hands the slot over: work in place
        if not self._selecting():
            k.subtract_(delta, inputs.base)
            return k.elected_sign_sum(delta, _zero_for_none(tuple(self.thresholds)), weight)
        active = [s is not None and not s.done for s in self.selectors]
        level = next(s.level for s in self.selectors if s is not None and not s.done)
        if level == 0:
            counts = k.task_vectors_(delta, inputs.base, active, None)
        else:
            k.subtract_(delta, inputs.base)
            picks = [(i, s.prefix) for i, s in enumerate(self.selectors) if active[i] and s is not None]
            refined = iter(k.refine_histograms(delta, picks))
            counts = [next(refined) if a else None for a in active]
        return counts + [delta[0].numel()]

    def absorb(self, total: Any) -> None:
        if total is None:  # no floating tensors at all
            self.selectors = [None] * len(self.selectors)
            self.majority = 1
            return
        if self._selecting():
            *counts, numel = total
            self.parameters = int(numel)
            for i, s in enumerate(self.selectors):
                if s is None:
                    continue
                first = s.level == 0
                # The reference keeps |x| >= kthvalue(|x|, D - floor(D density)) (m-th smallest),
                # which is the (floor(D density) + 1)-th largest.
                k = int(self.parameters * self.densities[i]) + 1 if first else None
                s.absorb(counts[i], k)
                if s.done:
                    self.thresholds[i] = s.value
            return
        self.majority = (total > 0) - (total < 0)

    def result(self) -> TiesModelContext:
        assert self.majority is not None
        return TiesModelContext(tuple(self.thresholds), self.majority, self.parameters)


def _tensor_bands(spec: TensorSpec) -> list[MagnitudeBand]:
    return [magnitude_band(d, math.prod(spec.shape)) for d in spec.params["density"]]


def prepare(specs: list[TensorSpec], dtype: torch.dtype) -> GlobalStatistics | None:
    check_density(specs, "ties")
    check_choice(specs, "scope", SCOPES, "ties")
    check_choice(specs, "aggregation", AGGREGATIONS, "ties")
    scope = check_uniform(specs, "scope", "one scope for the whole merge")
    if scope != "model":
        for spec in specs:
            if spec.params["aggregation"] != "dis-mean":
                raise RecipeError(
                    "parameters.aggregation: applies to scope: model (the paper's variants); "
                    "scope: tensor is mergekit's weighted mean, use normalize: false for a sum"
                )
        return split_tensor_statistics(specs, dtype, _tensor_bands)
    for spec in specs:
        if spec.params["rescale"]:
            raise RecipeError("parameters.rescale: not supported with ties scope: model")
    n_models = len(specs[0].params["density"]) if specs else 0
    densities = []
    for i in range(n_models):
        values = {s.params["density"][i] for s in specs}
        if len(values) > 1:
            raise RecipeError(
                f"density of {specs[0].model_label(i)}: ties scope: model trims each task vector with one "
                f"model-wide threshold, so its density cannot vary by tensor (got {sorted(values)}); "
                "use scope: tensor for per-tensor densities"
            )
        densities.append(values.pop())
    return TiesModelStatistics(densities, dtype)


def summarize_ties(totals: dict[str, float], refs: list[str], context: Any = None) -> dict[str, Any]:
    out = summarize(totals, refs, context)
    if isinstance(context, TiesModelContext):
        out["scope"] = "model"
        out["parameters_per_task"] = context.parameters
        out["majority_sign"] = context.majority_sign
        for row, thr in zip(out["models"], context.thresholds):
            row["threshold"] = thr
        shown = ", ".join("none" if t is None else f"{t:.4g}" for t in context.thresholds)
        out["lines"].append(
            f"  model-wide |delta| thresholds: {shown}; majority sign {context.majority_sign:+d}"
        )
    return out


register(
    MergeMethod(
        name="ties",
        fn=ties,
        params=(
            *common_params(normalize=True, rescale=False),
            Param("scope", "tensor", kind=str, doc="tensor (mergekit) | model (the paper)"),
            Param("aggregation", "dis-mean", kind=str, doc="scope model: dis-mean | dis-sum | dis-max"),
        ),
        base="required",
        summary="trim task vectors by magnitude, elect signs, merge the agreeing entries",
        paper="arXiv:2306.01708",
        # Per-tensor thresholds need the whole tensor; with scope: model the thresholds are known
        # before the output pass, so row blocks are fine.
        elementwise=lambda p: p.get("scope") == "model",
        # Per tensor, a tensor too big for the budget is split when its thresholds come from
        # statistics passes (not with rescale, which needs the whole tensor's L1 norms).
        splits_with_statistics=band_from_statistics,
        prepare=prepare,
        summarize=summarize_ties,
        fixed_scratch=fused.selection_bytes,  # one magnitude selection per model
        scratch_per_element=fused.in_place_scratch,
    )
)
