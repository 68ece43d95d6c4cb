"""NuSLERP: spherical interpolation of two models' weights, or of their task vectors, over the
whole tensor or vector by vector.

mergekit's ``nuslerp`` (0.1.5) defines it; task-vector SLERP follows WARP (Ramé et al.,
"WARP: On the Benefits of Weight Averaged Rewarded Policies", arXiv 2406.16768). Exactly two
models besides an optional base, each with a ``weight``; t = w_2 / (w_1 + w_2) (0.5 when
|w_1 + w_2| < 1e-6), so t = 0 gives the first model and t = 1 the second.

Without a base, v0 and v1 are the two models' tensors; with a base, their task vectors
(theta_i - theta_0) and the result is theta_0 + slerp(v0, v1). The vectors SLERP acts on:

* ``nuslerp_flatten: true`` (default): the whole tensor is one vector;
* ``nuslerp_flatten: false``: each vector along the last dimension (the rows of a matrix), or
  along dim 0 (the columns) with ``nuslerp_row_wise: true``. A 1-D tensor is one vector.

Per vector: u_j = v_j / max(|v_j|, 1e-7), cos = clamp(<u0, u1>, -1, 1), theta = arccos(cos);
where 1 - cos^2 <= 1e-16 (colinear) the result is the lerp (1 - t) v0 + t v1, otherwise
sin((1 - t) theta) / sin(theta) v0 + sin(t theta) / sin(theta) v1 on the unnormalised vectors.
Norms and dot products are float32 reductions as mergekit's; the angle and the coefficients are
computed in float64 (mergekit: float32), which moves results by float32 rounding only.
"""

from __future__ import annotations

import torch

from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register

NORM_FLOOR = 1e-7  # vector norms are clamped to at least this before normalising (mergekit)
COLINEAR_EPS = 1e-8  # colinear where 1 - cos^2 <= COLINEAR_EPS^2 (mergekit)
WEIGHT_SUM_FLOOR = 1e-6  # |w1 + w2| below this: t = 0.5 (mergekit)


def interpolation_t(weight: list[float]) -> float:
    total = weight[0] + weight[1]
    return 0.5 if abs(total) < WEIGHT_SUM_FLOOR else weight[1] / total


def slerp_vectors(v0: torch.Tensor, v1: torch.Tensor, t: float, dim: int | None) -> torch.Tensor:
    """SLERP of v0 and v1 seen as vectors along ``dim`` (None: the whole tensor is one)."""
    if dim is None:
        n0 = torch.linalg.vector_norm(v0).reshape(1)
        n1 = torch.linalg.vector_norm(v1).reshape(1)
        dot = (v0 * v1).sum().reshape(1)
    else:
        n0 = torch.linalg.vector_norm(v0, dim=dim, keepdim=True)
        n1 = torch.linalg.vector_norm(v1, dim=dim, keepdim=True)
        dot = (v0 * v1).sum(dim=dim, keepdim=True)
    norms = n0.double().clamp(min=NORM_FLOOR) * n1.double().clamp(min=NORM_FLOOR)
    cos = (dot.double() / norms).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin = torch.sin(theta)
    safe = torch.where(colinear, 1.0, sin)
    c0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / safe).to(v0.dtype)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / safe).to(v0.dtype)
    if dim is None:
        c0, c1 = c0.reshape(()), c1.reshape(())
    return (v0 * c0).add_(v1 * c1)


def nuslerp(
    inputs: MergeInputs, weight: list[float], nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True
) -> torch.Tensor:
    t = interpolation_t(weight)
    x = inputs.models
    if inputs.base is not None:
        x.sub_(inputs.base.unsqueeze(0))  # in place: the engine hands the stack over
    v0, v1 = x[0], x[1]
    if nuslerp_flatten or v0.dim() < 2:
        dim = None
    else:
        dim = 0 if nuslerp_row_wise else -1
    out = slerp_vectors(v0, v1, t, dim)
    if inputs.base is not None:
        out.add_(inputs.base)
    inputs.stats["t_sum"] = t
    inputs.stats["tensors"] = 1.0
    return out


register(
    MergeMethod(
        name="nuslerp",
        fn=nuslerp,
        params=(
            Param("weight", per_model=True, doc="relative weight; t = w2 / (w1 + w2)"),
            Param("nuslerp_row_wise", False, kind=bool, doc="unflattened: SLERP columns (dim 0), not rows"),
            Param("nuslerp_flatten", True, kind=bool, doc="SLERP the whole tensor as one vector"),
        ),
        base="optional",
        summary="SLERP of two models (or of their task vectors with a base), whole or per row/column",
        paper="mergekit nuslerp; arXiv:2406.16768",
        min_models=2,
        max_models=2,
        elementwise=False,  # angles over whole tensors, rows or columns
    )
)
