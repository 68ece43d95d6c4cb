"""nuslerp, multislerp, karcher under ``numerics: mergekit``.

* nuslerp: t = w2 / (w1 + w2) (0.5 when |w1 + w2| < 1e-6) in Python floats; the vectors (task
  vectors when there is a base) normalised by their norms clamped at 1e-7, cos clamped to
  [-1, 1], colinear where 1 - cos^2 <= 1e-16, then (sin((1 - t) theta) v0 + sin(t theta) v1) /
  sin(theta), or the lerp where colinear; every step in the compute dtype.
* multislerp: the weights as a compute-dtype tensor (divided by their sum when
  ``normalize_weights``), unit vectors x / (|x| + eps), the weighted mean direction, tangent
  projection, the exponential map back and the weighted mean norm, in the compute dtype.
* karcher: norms in float32 (float64 for float64 inputs), units rounded to the compute dtype,
  the fixed-point iteration with float32 0-d angles and compute-dtype vectors, the mean norm
  scale a float32 0-d tensor (so the result stays in the compute dtype).
"""

from __future__ import annotations

import torch

import weightsmith.ops.karcher  # noqa: F401 - registers the methods this module varies
import weightsmith.ops.multislerp  # noqa: F401
import weightsmith.ops.nuslerp  # noqa: F401
from weightsmith.errors import MergeError
from weightsmith.ops.mergekit_numerics.mode import MODE
from weightsmith.ops.registry import MergeInputs, register_numerics

COLINEAR_EPS = 1e-8
UNIT_EPS = 1e-7


def _slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=UNIT_EPS)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=UNIT_EPS)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def nuslerp(
    inputs: MergeInputs, weight: list[float], nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True
) -> torch.Tensor:
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    dim = 0 if nuslerp_row_wise else -1
    a, b = inputs.models[0], inputs.models[1]
    if inputs.base is None:
        return _slerp(t, a, b, dim, nuslerp_flatten)
    return inputs.base + _slerp(t, a - inputs.base, b - inputs.base, dim, nuslerp_flatten)


def multislerp(
    inputs: MergeInputs, weight: list[float], normalize_weights: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    base = inputs.base
    if inputs.models.shape[0] == 1:
        return inputs.models[0]
    tensors = inputs.models.clone()
    if base is not None:
        tensors -= base
    flat = tensors.view(tensors.shape[0], -1)
    w = torch.tensor(weight, dtype=tensors.dtype, device=tensors.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] != 2:
            raise MergeError(
                f"tensor {inputs.name!r}: the weighted sum of the unit task vectors is zero "
                "(antipodal inputs with balancing weights); change the weights"
            )
        res = (tensors[0] * w[0] + tensors[1] * w[1]).view(tensors.shape[1:])
        return res + base if base is not None else res
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(tensors.shape[1:])
    return result + base if base is not None else result


def karcher(inputs: MergeInputs, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    tensors = [*([inputs.base] if inputs.base is not None else []), *inputs.models]
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    work = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(work)) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    kept = [units[i] for i in valid]
    mean = torch.zeros_like(kept[0])
    for a, u in zip(weights, kept):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(work))
    mean = kept[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, kept):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(work))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(
            mean.dtype
        )
        unit_norm = torch.linalg.vector_norm(mean.to(work))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    inputs.stats["iterations"] = float(iterations)
    inputs.stats["tensors"] = 1.0
    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean


register_numerics("nuslerp", MODE, nuslerp)
register_numerics("multislerp", MODE, multislerp)
register_numerics("karcher", MODE, karcher)
