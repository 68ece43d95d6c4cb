"""WiSE-FT: interpolate between the base (zero-shot) model and one fine-tune.

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022 (arXiv 2109.01903).
theta = (1 - alpha) * theta_0 + alpha * theta_ft. Parameter: ``alpha`` (default 0.5);
alpha 0 gives the base and alpha 1 the fine-tune, bit for bit.
"""

from __future__ import annotations

import torch

from weightsmith.notices import warn
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, TensorSpec, register


def wise_ft(inputs: MergeInputs, alpha: float = 0.5) -> torch.Tensor:
    assert inputs.base is not None
    return (1 - alpha) * inputs.base + alpha * inputs.models[0]


def _prepare(specs: list[TensorSpec], dtype: torch.dtype) -> None:
    """alpha outside [0, 1] extrapolates past the base or the fine-tune: legitimate (WiSE-FT's
    paper explores it), but often a typo, so say it once."""
    outside = sorted({s.params["alpha"] for s in specs if not 0 <= s.params["alpha"] <= 1})
    if outside:
        shown = ", ".join(f"{a:g}" for a in outside[:3]) + (" ..." if len(outside) > 3 else "")
        warn(
            f"wise_ft: alpha {shown} is outside [0, 1], so the merge extrapolates beyond the "
            f"{'fine-tune' if outside[-1] > 1 else 'base'} (0 = base, 1 = fine-tune); "
            "intended? (extrapolation is legitimate)"
        )
    return None


register(
    MergeMethod(
        name="wise_ft",
        fn=wise_ft,
        params=(Param("alpha", 0.5, doc="0 = base, 1 = fine-tune"),),
        base="required",
        summary="(1 - alpha) * base + alpha * fine-tune",
        paper="arXiv:2109.01903",
        min_models=1,
        max_models=1,
        prepare=_prepare,
    )
)
