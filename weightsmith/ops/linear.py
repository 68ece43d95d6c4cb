"""Weighted average of whole models (model soups' uniform soup is equal weights).

Wortsman et al., "Model soups", ICML 2022 (arXiv 2203.05482).
Parameters: ``weight`` (per model, required), ``normalize`` (divide by the weight sum, default
true). Same semantics as mergekit's ``linear``.
"""

from __future__ import annotations

import torch

from weightsmith.errors import MergeError
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register


def linear(inputs: MergeInputs, weight: list[float], normalize: bool = True) -> torch.Tensor:
    x = inputs.models
    # Accumulate model by model with a fused multiply-add, and divide by the weight sum taken
    # in the compute dtype: the same operation order as mergekit, so results match bit for bit.
    out = inputs.output_buffer().zero_()
    for i, w in enumerate(weight):
        out.addcmul_(x[i], torch.tensor(w, dtype=x.dtype, device=x.device))
    if normalize:
        total = torch.tensor(weight, dtype=x.dtype, device=x.device).sum()
        if total == 0:
            raise MergeError(
                f"tensor {inputs.name!r}: linear weights sum to 0, so normalize cannot divide by "
                "them; change the weights for this tensor or set normalize: false"
            )
        out = out / total
    return out


register(
    MergeMethod(
        name="linear",
        fn=linear,
        params=(
            Param("weight", per_model=True, doc="weight of this model"),
            Param("normalize", True, kind=bool, doc="divide by the sum of weights"),
        ),
        base="unused",
        summary="weighted average of the models (uniform soup with equal weights)",
        paper="arXiv:2203.05482",
    )
)
