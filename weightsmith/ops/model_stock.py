"""Model Stock: interpolate between the base and the average of fine-tunes by their angle.

Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024
(arXiv 2403.19522). The official code is unreleased; this follows mergekit's ``model_stock``.
Needs a base and at least two fine-tunes (same task, different runs).

Per tensor (or per row along the last dimension with ``filter_wise: true``; a 1-D tensor is
one row): cos = mean over pairs i < j of <d_i, d_j> / max(|d_i| |d_j|, 1e-6), clamped to
[-1, 1], with d_i = theta_i - theta_0; t = N cos / (1 + (N - 1) cos), and t = 0 (keep the base)
where |1 + (N - 1) cos| < 1e-6; theta = t mean_i(theta_i) + (1 - t) theta_0.
"""

from __future__ import annotations

from typing import Any

import torch

from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register
from weightsmith.ops.sparse.report import record_inputs, record_output, summarize

NORM_FLOOR = 1e-6
SINGULAR = 1e-6


def model_stock(inputs: MergeInputs, filter_wise: bool = False) -> torch.Tensor:
    assert inputs.base is not None
    base, models = inputs.base, inputs.models
    n = models.shape[0]
    shape = base.shape
    if filter_wise:
        # Rows along the last dimension; a 1-D (or 0-D) tensor is one row.
        w0 = base.reshape(1, -1) if base.dim() < 2 else base
    else:
        w0 = base.reshape(-1)
    offsets = [m.reshape(w0.shape) - w0 for m in models]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            c = (offsets[i] * offsets[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=NORM_FLOOR)
            cos_sum.add_(c.clamp(-1, 1))
            pairs += 1
    cos = (cos_sum / pairs).unsqueeze(-1)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < SINGULAR
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denom))
    average = models[0].reshape(w0.shape).clone()
    for i in range(1, n):
        average.add_(models[i].reshape(w0.shape))
    average.div_(n)
    out = (t * average + (1 - t) * w0).reshape(shape)
    stats = inputs.stats
    record_inputs(stats, inputs, None)
    stats["t_sum"] = float(t.sum())
    stats["t_count"] = float(t.numel())
    stats["singular"] = float(singular.sum())
    record_output(stats, inputs, out)
    return out


def summarize_stock(totals: dict[str, float], refs: list[str], context: Any = None) -> dict[str, Any]:
    out = summarize(totals, refs, context)
    if totals.get("t_count"):
        out["mean_t"] = totals["t_sum"] / totals["t_count"]
        out["singular_filters"] = int(totals.get("singular", 0))
        out["lines"].append(
            f"  mean interpolation ratio t {out['mean_t']:.4f} over {int(totals['t_count'])} "
            f"filters ({out['singular_filters']} singular, kept the base)"
        )
    return out


register(
    MergeMethod(
        name="model_stock",
        fn=model_stock,
        params=(Param("filter_wise", False, kind=bool, doc="one ratio per row instead of per tensor"),),
        base="required",
        summary="t * mean(fine-tunes) + (1 - t) * base, t from the fine-tunes' angle",
        paper="arXiv:2403.19522",
        min_models=2,
        elementwise=False,  # the angle is over the whole tensor (or whole rows)
        summarize=summarize_stock,
    )
)
