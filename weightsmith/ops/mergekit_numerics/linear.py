"""linear under ``numerics: mergekit``.

mergekit 0.1.5 accumulates a linear merge of 16-bit tensors in float32 whatever ``dtype`` says:
a float32 zero tensor, one fused multiply-add per model with its float32 weight, a division by
the float32 weight sum, and one rounding to the inputs' dtype at the end. weightsmith's default
does the same in float32 and rounds when writing; under the mergekit mode the inputs arrive in
``dtype``, so this variant widens them itself.
"""

from __future__ import annotations

import torch

import weightsmith.ops.linear  # noqa: F401 - registers the method this module varies
from weightsmith.errors import MergeError
from weightsmith.ops.mergekit_numerics.mode import MODE
from weightsmith.ops.registry import MergeInputs, register_numerics


def linear(inputs: MergeInputs, weight: list[float], normalize: bool = True) -> torch.Tensor:
    x = inputs.models
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    weights = torch.tensor(weight, dtype=work, device=x.device)
    out = torch.zeros_like(x[0], dtype=work)
    for i in range(x.shape[0]):
        out.addcmul_(x[i], weights[i])
    if normalize:
        total = weights.sum()
        if total == 0:
            raise MergeError(
                f"tensor {inputs.name!r}: linear weights sum to 0, so normalize cannot divide by "
                "them; change the weights for this tensor or set normalize: false"
            )
        out.div_(total)
    return out.to(x.dtype)


register_numerics("linear", MODE, linear)
