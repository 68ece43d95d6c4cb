"""Antidote: one-shot pruning of the weights a harmful fine-tune relies on.

Huang et al., "Antidote: Post-fine-tuning Safety Alignment for Large Language Models against
Harmful Fine-tuning", ICML 2025 (arXiv 2408.09600); reference code git-disl/Antidote
(``utils.prune_wanda_outlier``).

Inputs: the aligned model as ``base_model`` and the (harmfully) fine-tuned model as the one
model. For every eligible weight W (out x in) of the fine-tune, a Wanda score
S[i, j] = |X[i, j]| * n[j], where n[j] is the L2 norm of input feature j over a harmful
calibration set (``calibration:`` block; ``finetune.feature_norms``) and X is the task vector
(``target: delta``) or W itself (``target: weights``). Per output row i the ceil(mask_ratio *
in) highest-scoring entries are removed: ``target: delta`` (default) resets them to the aligned
model's values, ``target: weights`` sets them to zero (the reference code's full-fine-tuning
behaviour). Every other tensor and entry is the fine-tune's.

The feature norms are computed once, before the merge, by ``weightsmith merge`` / ``merge()``
(``weightsmith/data_steps.py``) and reach this operator as ``inputs.context``; the operator never
runs a model. ``score: magnitude`` (n = 1, no data) and ``score: random`` (seeded uniform
scores) are the reference's baselines.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.errors import MergeError, RecipeError
from weightsmith.ops.param_checks import check_choice, check_fraction, check_uniform
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, TensorSpec, register

TARGETS = ("delta", "weights")
SCORES = ("wanda", "magnitude", "random")


@dataclass(frozen=True)
class AntidoteContext:
    """What the calibration step found: the tensors to prune and their input-feature norms.

    ``norms`` maps output tensor names to a float vector of length in_features (only with
    ``score: wanda``); ``eligible`` lists the output tensors the operator prunes.
    """

    eligible: frozenset[str]
    norms: dict[str, torch.Tensor]
    calibration: dict[str, Any] | None = None
    skipped: tuple[str, ...] = ()  # matched ``modules`` but are not linear-layer weights


def removed_per_row(cols: int, ratio: float) -> int:
    """How many entries of a row of ``cols`` are removed: ceil(ratio * cols).

    The reference keeps the int((1 - ratio) * cols) lowest scores, the same count in exact
    arithmetic; rounding to 9 places first keeps 0.9 * 10 from becoming 10 - 1e-15 -> 9 or 10.
    """
    return min(cols, math.ceil(round(cols * ratio, 9)))


def top_per_row(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the ceil(ratio * cols) highest scores of each row (last dimension).

    A stable ascending sort, as the reference: among equal scores the later column counts as
    higher, so the mask is a function of the scores alone.
    """
    cols = scores.shape[-1]
    remove = removed_per_row(cols, ratio)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if remove == 0:
        return mask
    order = torch.argsort(scores, dim=-1, stable=True)
    mask.scatter_(-1, order[..., cols - remove :], True)
    return mask


def antidote(
    inputs: MergeInputs,
    mask_ratio: float = 0.1,
    target: str = "delta",
    score: str = "wanda",
    modules: str = "",
) -> torch.Tensor:
    ctx = inputs.context
    if not isinstance(ctx, AntidoteContext):
        raise MergeError(
            f"tensor {inputs.name!r}: antidote needs its calibration step (input-feature norms "
            "of the fine-tune on the harmful data); run it through weightsmith merge / merge()"
        )
    ft = inputs.models[0]
    stats = inputs.stats
    if inputs.name not in ctx.eligible:
        return ft
    if target == "delta" and inputs.base is None:
        raise MergeError(
            f"tensor {inputs.name!r}: antidote target: delta needs base_model (the aligned model)"
        )
    stats["eligible"] = float(ft.numel())
    if target == "delta":
        assert inputs.base is not None
        x = ft - inputs.base
        stats["sq_delta"] = float(torch.linalg.vector_norm(x)) ** 2
    else:
        x = ft.clone()
        stats["sq_weights"] = float(torch.linalg.vector_norm(x)) ** 2
    if mask_ratio <= 0:
        return ft
    if score == "random":
        s = torch.rand(x.shape, generator=inputs.generator, dtype=x.dtype, device=x.device)
    else:
        s = x.abs()
        if score == "wanda":
            s.mul_(ctx.norms[inputs.name].to(device=s.device, dtype=s.dtype))
    mask = top_per_row(s, mask_ratio)
    del s
    removed = x.masked_fill_(~mask, 0)  # the entries taken away (delta or weight values)
    stats["removed"] = float(mask.sum())
    stats["sq_removed"] = float(torch.linalg.vector_norm(removed)) ** 2
    del removed, x
    out = inputs.output_buffer()
    # A select, not ft - removed: the reset entries must equal the aligned model's bit for bit.
    if target == "delta":
        assert inputs.base is not None
        return torch.where(mask, inputs.base, ft, out=out)
    return torch.where(mask, torch.zeros((), dtype=ft.dtype, device=ft.device), ft, out=out)


def prepare(specs: list[TensorSpec], dtype: torch.dtype) -> None:
    check_choice(specs, "target", TARGETS, "antidote")
    check_choice(specs, "score", SCORES, "antidote")
    for name, why in (
        ("target", "one target for the whole merge"),
        ("score", "one score for the whole merge"),
        ("modules", "it selects tensors; vary mask_ratio by filter instead"),
    ):
        check_uniform(specs, name, why)
    check_fraction(
        specs, "mask_ratio", "antidote", meaning="the fraction of each row removed", high_open=True
    )
    pattern = specs[0].params["modules"] if specs else ""
    try:
        re.compile(pattern)
    except re.error as e:
        raise RecipeError(
            f"parameters.modules: {pattern!r} is not a valid regular expression ({e})"
        ) from None
    return None


def summarize(totals: dict[str, float], refs: list[str], context: Any = None) -> dict[str, Any]:
    eligible = totals.get("eligible", 0.0)
    removed = totals.get("removed", 0.0)
    out: dict[str, Any] = {
        "eligible_parameters": int(eligible),
        "removed_parameters": int(removed),
        "removed_fraction": removed / eligible if eligible else 0.0,
    }
    lines = [f"  antidote: removed {int(removed):,} of {int(eligible):,} eligible weights "
             f"({out['removed_fraction']:.2%})"]
    if "sq_delta" in totals:
        share = totals.get("sq_removed", 0.0) / totals["sq_delta"] if totals["sq_delta"] else 0.0
        out["task_vector_sq_norm_removed"] = share
        lines.append(f"  reset to the aligned model: {share:.2%} of the eligible task vector's squared norm")
    elif "sq_weights" in totals:
        share = totals.get("sq_removed", 0.0) / totals["sq_weights"] if totals["sq_weights"] else 0.0
        out["weights_sq_norm_removed"] = share
        lines.append(f"  zeroed: {share:.2%} of the eligible weights' squared norm")
    if isinstance(context, AntidoteContext):
        out["eligible_tensors"] = sorted(context.eligible)
        out["calibration"] = context.calibration
        if context.skipped:
            out["skipped_tensors"] = list(context.skipped)
    out["lines"] = lines
    return out


register(
    MergeMethod(
        name="antidote",
        fn=antidote,
        params=(
            Param("mask_ratio", 0.1, doc="fraction of each output row removed, in [0, 1)"),
            Param("target", "delta", kind=str, doc="delta (reset to the aligned base) | weights (zero)"),
            Param("score", "wanda", kind=str, doc="wanda (needs `calibration:`) | magnitude | random"),
            Param("modules", "", kind=str, doc="regex: which weights are eligible (default: every linear)"),
        ),
        base="optional",
        summary="prune the weights a harmful fine-tune uses (Wanda scores on harmful data), per row",
        paper="arXiv:2408.09600",
        min_models=1,
        max_models=1,
        # Per-row selection: row blocks are independent, except that a random score would
        # restart its generator in every block.
        elementwise=lambda p: p.get("score") != "random",
        uses_randomness=True,
        prepare=prepare,
        summarize=summarize,
    )
)
