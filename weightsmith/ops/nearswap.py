"""NearSwap: take the other model's value only where it is already close to the base's.

Defined by mergekit's ``nearswap`` (0.1.5; first used for alchemonaut/QuartetAnemoi-70B).
Exactly one model besides the base. Per element, with a = theta_0 (base) and b = theta_1:

    w = clamp(t / max(|a - b|, 1e-6), 0, 1);  theta = w b + (1 - w) a

so elements within ``t`` of each other become b, and farther ones move towards b by t / |a - b|
(a step of length t). ``t`` (required) may vary by filter and layer gradient. t = 0 gives the
base, bit for bit. Elementwise, in mergekit's operation order (same float32 results).
"""

from __future__ import annotations

import torch

from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register

DIFF_FLOOR = 1e-6  # |a - b| is floored here before dividing (mergekit)


def nearswap(inputs: MergeInputs, t: float) -> torch.Tensor:
    assert inputs.base is not None
    a, b = inputs.base, inputs.models[0]
    w = (a - b).abs_().clamp_(min=DIFF_FLOOR)
    # t / d as torch evaluates a scalar over a tensor (reciprocal, then multiply), mergekit's
    # expression: one rounding more than a true division, kept for identical bits.
    w = w.reciprocal_().mul_(t).clamp_(0, 1)
    out = inputs.output_buffer()
    torch.mul(w, b, out=out)
    return out.add_(w.neg_().add_(1).mul_(a))


register(
    MergeMethod(
        name="nearswap",
        fn=nearswap,
        params=(Param("t", doc="distance within which the model's value replaces the base's"),),
        base="required",
        summary="move each base weight towards the model by at most t (swap where within t)",
        paper="mergekit nearswap",
        min_models=1,
        max_models=1,
    )
)
