"""slerp and model_stock under ``numerics: mergekit``.

slerp: mergekit 0.1.5 works in float32 (float64 for float64 inputs) whatever ``dtype`` says:
norms are vector norms of the flattened tensors (a norm <= 1e-8 taken as 1), the dot product is
the sum of the products of the normalised float32 copies, clamped to [-1, 1]; |dot| > 0.9995
lerps; the float32 result ``c0 * v0 + c1 * v1`` is rounded once to the compute dtype. weightsmith's
default accumulates the dot in float64 and scales in the tensor's dtype.

model_stock: every step in the compute dtype, in mergekit's order: offsets from the base, the
pairwise cosines (dot over the product of norms clamped at 1e-6, clamped to [-1, 1]) stacked
and averaged, t = N cos / (1 + (N - 1) cos) (0 where the denominator is under 1e-6), the
models' running sum over N, and t * average + (1 - t) * base.
"""

from __future__ import annotations

import torch

import weightsmith.ops.model_stock  # noqa: F401 - registers the methods this module varies
import weightsmith.ops.slerp  # noqa: F401
from weightsmith.ops.mergekit_numerics.mode import MODE
from weightsmith.ops.registry import MergeInputs, register_numerics

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
NORM_FLOOR = 1e-6
SINGULAR = 1e-6


def slerp(inputs: MergeInputs, t: float) -> torch.Tensor:
    assert inputs.base is not None
    v0, v1 = inputs.base, inputs.models[0]
    work = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1).to(work)
    b = v1.reshape(1, -1).to(work)
    tt = torch.tensor([[t]], dtype=work)
    if a.shape[1] == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    # The norm of a one-element stack of norms is that norm: one chunk at these sizes (mergekit
    # splits rows of over 2^20 elements, whose float32 partial norms may round differently).
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    inputs.stats["lerp_fallback"] = float(linear.item())
    inputs.stats["tensors"] = 1.0
    return (coef_a * a + coef_b * b).to(v0.dtype).reshape(v0.shape)


def model_stock(inputs: MergeInputs, filter_wise: bool = False) -> torch.Tensor:
    assert inputs.base is not None
    w0 = inputs.base
    shape = w0.shape
    ws = list(inputs.models)
    if filter_wise:
        if w0.dim() == 1:
            w0 = w0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w0 = w0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=NORM_FLOOR)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)
    total = ws[0] + 0  # a new tensor: the models are summed in order, each sum rounded
    for w in ws[1:]:
        total = total + w
    average = total / n
    inputs.stats["t_sum"] = float(t.float().sum())
    inputs.stats["t_count"] = float(t.numel())
    inputs.stats["singular"] = float(singular.sum())
    return (t * average + (1 - t) * w0).reshape(shape)


register_numerics("slerp", MODE, slerp)
register_numerics("model_stock", MODE, model_stock)
