"""SCE: Select (by variance across models), Calculate (per-matrix weights), Erase (sign
conflicts), then a weighted average of the surviving task vectors.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 (arXiv 2408.07990), section 3.3;
the recipe surface and the exact rules are mergekit's ``sce`` (0.1.5). Per tensor, with task
vectors delta_i = theta_i - theta_0 (i = 1..N):

1. Select (``select_topk`` = tau, default 1 = keep all): the variance across models
   var = mean_i (delta_i - mean_j delta_j)^2 at each coordinate; with m the number of
   coordinates of non-zero variance, k = floor(m * tau) (the product in float32, as mergekit);
   coordinates outside the k largest variances are zeroed in every delta_i (k = 0 or tau <= 0:
   all of them). Coordinates tied with the k-th largest variance are all kept, where mergekit
   keeps exactly k in its sort's order.
2. Calculate: w_i = mean(delta_i^2) over the tensor (after the selection), normalised to sum to
   1 (all 1/N when that sum is below 1e-6).
3. Erase: elected sign s = +1 where sum_i delta_i >= 0, else -1 (unweighted, as mergekit);
   model i takes part at a coordinate iff sign(delta_i) == s (zeros never do).
4. theta = theta_0 + sum_i w_i delta_i [agree_i] / max(sum_i w_i [agree_i], 1e-6).

``int8_mask`` is accepted for mergekit recipes and has no effect. The variance selection and
the weights are per-tensor statistics, so the method takes whole tensors (``elementwise`` false).
"""

from __future__ import annotations

import torch

from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register

WEIGHT_SUM_FLOOR = 1e-6  # below it the per-matrix weights fall back to uniform (mergekit)
DIVISOR_FLOOR = 1e-6  # the erased weights' sum is clamped to at least this (mergekit)


def variance_selection_count(nonzero: int, select_topk: float) -> int:
    """k = floor(nonzero * select_topk) with the product rounded to float32 as mergekit's
    tensor arithmetic does (90 * 0.7 gives 63 there, 62 in float64)."""
    return int((torch.tensor(nonzero, dtype=torch.int64) * select_topk).item())


def select_by_variance_(delta: torch.Tensor, select_topk: float) -> float:
    """Zero, in every task vector, the coordinates outside the top-k variance; returns the
    share of coordinates kept."""
    if select_topk >= 1:
        return 1.0
    if select_topk <= 0:
        delta.zero_()
        return 0.0
    var = torch.var(delta, dim=0, unbiased=False)
    k = variance_selection_count(int(torch.count_nonzero(var)), select_topk)
    if k == 0:
        delta.zero_()
        return 0.0
    flat = var.reshape(-1)
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest
    keep = var >= threshold
    delta.mul_(keep)
    return float(keep.sum()) / max(keep.numel(), 1)


def sce_weights(delta: torch.Tensor) -> list[float]:
    """Per-model weights: mean of squares of each task vector, normalised to sum to 1."""
    n = delta.shape[0]
    squares = [float(delta[i].square().mean()) if delta[i].numel() else 0.0 for i in range(n)]
    total = sum(squares)
    if abs(total) < WEIGHT_SUM_FLOOR:
        return [1.0 / n] * n
    return [s / total for s in squares]


def sce(inputs: MergeInputs, select_topk: float = 1.0, int8_mask: bool = False) -> torch.Tensor:
    assert inputs.base is not None
    base = inputs.base
    delta = inputs.models.sub_(base.unsqueeze(0))  # in place: the engine hands the stack over
    kept = select_by_variance_(delta, select_topk)
    weights = sce_weights(delta)
    positive = delta.sum(0) >= 0
    merged = inputs.output_buffer().zero_()
    divisor = torch.zeros_like(merged)
    for i, w in enumerate(weights):
        d = delta[i]
        agree = torch.where(positive, d > 0, d < 0)
        erased = agree * torch.tensor(w, dtype=d.dtype, device=d.device)
        merged.addcmul_(d, erased)
        divisor.add_(erased)
    merged.div_(divisor.clamp_(min=DIVISOR_FLOOR)).add_(base)
    stats = inputs.stats
    stats["numel"] = float(base.numel())
    stats["selected"] = kept * base.numel()
    for i, w in enumerate(weights):
        stats[f"weight_sum[{i}]"] = w
    stats["tensors"] = 1.0
    return merged


def summarize_sce(totals: dict[str, float], refs: list[str], context: object = None) -> dict:
    n = totals.get("numel", 0.0)
    tensors = totals.get("tensors", 0.0) or 1.0
    out: dict = {"coordinates": int(n), "selected_fraction": totals.get("selected", 0.0) / n if n else 0.0}
    out["models"] = [
        {"model": ref, "mean_weight": totals.get(f"weight_sum[{i}]", 0.0) / tensors}
        for i, ref in enumerate(refs)
    ]
    lines = [f"  selected {out['selected_fraction']:.2%} of coordinates by variance"]
    lines += [f"  {m['model']}: mean per-tensor weight {m['mean_weight']:.4f}" for m in out["models"]]
    out["lines"] = lines
    return out


register(
    MergeMethod(
        name="sce",
        fn=sce,
        params=(
            Param("select_topk", 1.0, doc="fraction of coordinates kept, by variance across models"),
            Param("int8_mask", False, kind=bool, doc="accepted for mergekit recipes", ignored=True),
        ),
        base="required",
        summary="keep top-variance coordinates, weight models by mean square, erase sign conflicts",
        paper="arXiv:2408.07990",
        elementwise=False,  # variance selection and weights are per tensor
        summarize=summarize_sce,
    )
)
