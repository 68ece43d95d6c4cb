"""Arcee Fusion: keep the fine-tune's change only where it matters most, judged by the size of
the change times how much it moves the row's softmax distribution.

Defined by mergekit's ``arcee_fusion`` (0.1.5; Arcee AI, no paper). The base and exactly one
other model, no parameters. Per tensor, with a = theta_0 and b = theta_1:

* importance = |b - a| * KL_row, KL_row = sum_j p_j log(p_j / q_j) over the last dimension, with
  p = softmax(b) + 1e-8 and q = softmax(a) + 1e-8 along that dimension (a 1-D tensor is one row);
* threshold = median + 1.5 (Q3 - Q1) of the importance over the tensor, where the quantile
  q is the element of rank floor(q (n - 1)) (0-based) of the sorted importances;
* theta = a + (b - a) [importance >= threshold].

The quantiles are exact here for every tensor size. mergekit sorts at most 1M importances: for
bigger tensors it samples 1M with replacement from torch's global generator, so its threshold
(and output) for such tensors is random and not reproducible; below 1M elements the two agree.
Everything else follows mergekit's float32 operation order. The quantiles are per-tensor
statistics, so the method takes whole tensors.
"""

from __future__ import annotations

import torch

from weightsmith.ops.registry import MergeInputs, MergeMethod, register

PROB_EPS = 1e-8  # added to both softmax distributions before the KL divergence (mergekit)
QUANTILES = (0.25, 0.5, 0.75)


def importance_scores(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|model - base| times the row's KL(softmax(model) || softmax(base))."""
    if model.dim() == 0:
        return (model - base).abs()  # a scalar: one-element rows have KL 0
    p = torch.softmax(model, dim=-1).add_(PROB_EPS)
    q = torch.softmax(base, dim=-1).add_(PROB_EPS)
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (model - base).abs_().mul_(kl)


def quantile_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 IQR, each quantile the element of rank floor(q (n - 1)) of the sorted scores
    (the ranks computed in float32, as mergekit's index tensor)."""
    flat = scores.reshape(-1)
    ranks = (torch.tensor(QUANTILES, dtype=torch.float32) * (flat.numel() - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat, r + 1).values for r in ranks)
    return median + 1.5 * (q3 - q1)


def arcee_fusion(inputs: MergeInputs) -> torch.Tensor:
    assert inputs.base is not None
    a, b = inputs.base, inputs.models[0]
    if a.numel() == 0:
        return a.clone()
    scores = importance_scores(b, a)
    keep = scores >= quantile_threshold(scores)
    del scores
    delta = b.sub_(a).mul_(keep)  # in place: the engine hands the stack over
    inputs.stats["numel"] = float(a.numel())
    inputs.stats["fused"] = float(keep.sum())
    return delta.add_(a)


def summarize_fusion(totals: dict[str, float], refs: list[str], context: object = None) -> dict:
    n = totals.get("numel", 0.0)
    share = totals.get("fused", 0.0) / n if n else 0.0
    return {"fused_fraction": share, "lines": [f"  took the model's change at {share:.2%} of coordinates"]}


register(
    MergeMethod(
        name="arcee_fusion",
        fn=arcee_fusion,
        params=(),
        base="required",
        summary="keep the model's changes whose |delta| x row KL is above median + 1.5 IQR",
        paper="mergekit arcee_fusion",
        min_models=1,
        max_models=1,
        elementwise=False,  # the threshold is a per-tensor quantile
        summarize=summarize_fusion,
    )
)
