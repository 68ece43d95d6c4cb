"""SLERP: spherical interpolation between the base and one other model, tensor by tensor.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; for model merging the
reference is mergekit's ``slerp``, whose semantics this follows. The recipe names the base
(t = 0) and one other model (t = 1), as mergekit's (listing the base among ``models`` too is
fine). ``t`` (required) may vary by filter and layer gradient like any parameter.

Per tensor, with v0 = base and v1 = model flattened: normalise copies (a norm <= 1e-8 is left
alone), d = clamp(<u0, u1>, -1, 1); if |d| > 0.9995 the two are nearly colinear and the result
is the lerp (1 - t) v0 + t v1; otherwise Omega = arccos d and the result is
sin((1 - t) Omega) / sin Omega * v0 + sin(t Omega) / sin Omega * v1, applied to the unnormalised
tensors. t = 0 gives the base and t = 1 the model, bit for bit. Norms and the dot product are
accumulated in float64 (mergekit sums float32 chunks), so coefficients can differ from
mergekit's in the last bits.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register
from weightsmith.ops.sparse.report import record_inputs, record_output, summarize

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
CHUNK = 1 << 20


def slerp_coefficients(v0: torch.Tensor, v1: torch.Tensor, t: float) -> tuple[float, float, bool]:
    """(coefficient of v0, coefficient of v1, whether the colinear lerp fallback was taken)."""
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    saa = sbb = sab = 0.0
    # float64 sums over 1M-element chunks: accurate, with bounded float64 scratch.
    for start in range(0, a.numel(), CHUNK):
        x = a[start : start + CHUNK].double()
        y = b[start : start + CHUNK].double()
        saa += float(torch.dot(x, x))
        sbb += float(torch.dot(y, y))
        sab += float(torch.dot(x, y))
    na = math.sqrt(saa)
    nb = math.sqrt(sbb)
    na = na if na > NORM_EPS else 1.0
    nb = nb if nb > NORM_EPS else 1.0
    dot = sab / (na * nb)
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t, True
    omega = math.acos(dot)
    s = math.sin(omega)
    return math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s, False


def slerp(inputs: MergeInputs, t: float) -> torch.Tensor:
    assert inputs.base is not None
    v0, v1 = inputs.base, inputs.models[0]
    c0, c1, linear = slerp_coefficients(v0, v1, t)
    record_inputs(inputs.stats, inputs, None)
    inputs.stats["lerp_fallback"] = float(linear)
    inputs.stats["tensors"] = 1.0
    out = v0 * c0
    out.add_(v1, alpha=c1)
    record_output(inputs.stats, inputs, out)
    return out


def summarize_slerp(totals: dict[str, float], refs: list[str], context: Any = None) -> dict[str, Any]:
    out = summarize(totals, refs, context)
    if "lerp_fallback" in totals:
        out["lerp_fallback_tensors"] = int(totals["lerp_fallback"])
        out["lines"].append(
            f"  {int(totals['lerp_fallback'])} of {int(totals.get('tensors', 0))} tensors were "
            f"nearly colinear (|cos| > {DOT_THRESHOLD}) and were lerped"
        )
    return out


register(
    MergeMethod(
        name="slerp",
        fn=slerp,
        params=(Param("t", doc="0 = base, 1 = the other model"),),
        base="required",
        summary="spherical interpolation between the base (t=0) and one model (t=1)",
        paper="mergekit slerp",
        min_models=1,
        max_models=1,
        elementwise=False,  # the angle is over the whole tensor
        summarize=summarize_slerp,
    )
)
