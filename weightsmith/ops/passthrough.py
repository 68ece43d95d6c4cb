"""Passthrough: copy the single input's tensors, optionally scaled.

mergekit's ``passthrough`` (0.1.5). Exactly one input (a ``base_model`` counts as one); each
tensor is copied, times ``scale`` (per model, default 1: an exact copy) where given, e.g.
``scale: 0`` on a filter to zero o_proj/down_proj of a duplicated layer. mergekit uses it
mostly with ``slices:`` for frankenmerges, which weightsmith does not support yet; with
``models:`` it copies (and rescales or casts) one checkpoint. Elementwise.
"""

from __future__ import annotations

import torch

from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register


def passthrough(inputs: MergeInputs, scale: list[float]) -> torch.Tensor:
    x = inputs.models[0]
    if scale[0] == 1.0:
        return x  # x * 1 would be the same bits; skip the pass
    return torch.mul(x, scale[0], out=inputs.output_buffer())


register(
    MergeMethod(
        name="passthrough",
        fn=passthrough,
        params=(Param("scale", 1.0, per_model=True, doc="multiply the tensor by this"),),
        base="unused",
        summary="copy the single input's tensors (times scale)",
        paper="mergekit passthrough",
        min_models=1,
        max_models=1,
    )
)
