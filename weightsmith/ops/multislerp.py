"""Multi-SLERP: a weighted spherical barycentre of two or more models (or of their task
vectors, given a base), tensor by tensor.

mergekit's ``multislerp`` (0.1.5; C. Goddard, "multislerp", goddard.blog 2025) defines it. Per
tensor, x_i = theta_i (or theta_i - theta_0 with a base), flattened; weights w_i, divided by
their sum when ``normalize_weights`` (default true). With u_i = x_i / (|x_i| + eps):

    m = sum_i w_i u_i;  result = m / |m| * sum_i w_i |x_i|   (+ theta_0 with a base)

i.e. the direction of the weighted mean of the unit vectors, with the weighted mean norm.
mergekit states it as a tangent-space mean: project the u_i onto the tangent space at
m / |m|, average with the weights, map back with the exponential map. That weighted tangent
average is exactly zero (sum_i w_i (u_i - <u_i, m^> m^) = m - |m| m^ = 0), so the exponential
map returns m^ itself; mergekit's float32 version adds only its rounding residual, which this
closed form leaves out. Where |m| < eps (antipodal inputs whose weights cancel): two models
give the lerp w_1 x_1 + w_2 x_2 (+ theta_0), more raise an error, as mergekit. One model is
returned as it is. ``eps`` defaults to 1e-8.
"""

from __future__ import annotations

import torch

from weightsmith.errors import MergeError
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register


def multislerp(
    inputs: MergeInputs, weight: list[float], normalize_weights: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    x = inputs.models
    n = x.shape[0]
    if n == 1:
        return x[0]
    base = inputs.base
    if base is not None:
        x.sub_(base.unsqueeze(0))  # in place: the engine hands the stack over
    w = list(weight)
    if normalize_weights:
        total = sum(w)
        if total == 0:
            raise MergeError(
                f"tensor {inputs.name!r}: multislerp weights sum to 0, so normalize_weights cannot "
                "divide by them; change the weights or set normalize_weights: false"
            )
        w = [v / total for v in w]
    flat = x.reshape(n, -1)
    norms = [float(torch.linalg.vector_norm(flat[i])) for i in range(n)]
    mean = inputs.output_buffer().zero_().reshape(-1)
    for i in range(n):
        mean.add_(flat[i], alpha=w[i] / (norms[i] + eps))
    mean_norm = float(torch.linalg.vector_norm(mean))
    if mean_norm < eps:
        if n != 2:
            raise MergeError(
                f"tensor {inputs.name!r}: the weighted mean of the {n} unit-norm inputs is zero "
                "(antipodal inputs whose weights cancel); multislerp has no direction to follow: "
                "change the weights"
            )
        mean.copy_(flat[0]).mul_(w[0]).add_(flat[1], alpha=w[1])
    else:
        scale = sum(wi * ni for wi, ni in zip(w, norms))
        mean.mul_(scale / mean_norm)
    out = mean.reshape(x.shape[1:])
    if base is not None:
        out.add_(base)
    inputs.stats["tensors"] = 1.0
    inputs.stats["fallback"] = float(mean_norm < eps)
    return out


register(
    MergeMethod(
        name="multislerp",
        fn=multislerp,
        params=(
            Param("weight", per_model=True, doc="weight of this model in the barycentre"),
            Param("normalize_weights", True, kind=bool, doc="divide the weights by their sum"),
            Param("eps", 1e-8, doc="added to norms; below it the mean direction is undefined"),
        ),
        base="optional",
        summary="spherical barycentre of the models (or of their task vectors, given a base)",
        paper="mergekit multislerp",
        min_models=1,
        elementwise=False,  # norms and the mean direction are over the whole tensor
    )
)
