"""WiSE-FT: interpolate between the base (zero-shot) model and one fine-tune.

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022 (arXiv 2109.01903).
theta = (1 - alpha) * theta_0 + alpha * theta_ft. Parameter: ``alpha`` (default 0.5);
alpha 0 gives the base and alpha 1 the fine-tune, bit for bit.
"""

from __future__ import annotations

import torch

from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register


def wise_ft(inputs: MergeInputs, alpha: float = 0.5) -> torch.Tensor:
    assert inputs.base is not None
    return (1 - alpha) * inputs.base + alpha * inputs.models[0]


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
    )
)
