"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the unit sphere,
rescaled by their mean norm, tensor by tensor.

Karcher, "Riemannian center of mass and mollifier smoothing", CPAM 1977; for model merging
mergekit's ``karcher`` (0.1.5, arXiv 2603.04972) defines the recipe surface and the iteration
followed here. All inputs weigh 1/N; a ``base_model`` is one more input (mergekit ignores the
base role). Per tensor, with x_i flattened, n_i = |x_i|, u_i = x_i / n_i:

* inputs with n_i <= ``tol`` are left out of the direction (all of them: the result is 0);
* start: m = normalise(sum_i a_i u_i) over the others (a_i = 1/N renormalised to sum 1;
  m = the first one's u_i if that sum's norm is below ``tol``);
* up to ``max_iter`` (10) times: theta_i = arccos(clamp(<m, u_i>, -1, 1)); the log-map mean
  T = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m) over theta_i >= tol; stop when
  |T| < ``tol`` (1e-5); else m = cos|T| m + sin|T| T / |T|, renormalised;
* result = (sum_i n_i / N) m.

Every iterate lies in the span of the u_i, so the iteration runs on N coefficients and the N x N
Gram matrix of the inputs (dot products accumulated in float64), and the tensor is touched
twice: once for the Gram matrix, once to write sum_i c_i x_i. mergekit runs the same iteration
on float32 tensors; results differ by float32 rounding (and, where |T| lands within rounding
of ``tol``, by one more or one fewer step of size ~tol).
"""

from __future__ import annotations

import math

import torch

from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register

CHUNK = 1 << 20  # columns per float64 Gram-matrix step: bounded scratch


def gram_matrix(flat: torch.Tensor) -> torch.Tensor:
    """G[i, j] = <x_i, x_j> in float64 for the rows of ``flat`` ([N, numel])."""
    n = flat.shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[1], CHUNK):
        block = flat[:, start : start + CHUNK].double()
        gram += block @ block.T
    return gram.cpu()


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> tuple[list[float], int]:
    """Coefficients c with result = sum_i c_i x_i, and the iterations run."""
    n = gram.shape[0]
    norms = gram.diagonal().clamp(min=0).sqrt()
    alphas = [1.0 / n] * n
    scale = sum(a * float(v) for a, v in zip(alphas, norms))
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return [0.0] * n, 0
    idx = torch.tensor(valid)
    nv = norms[idx]
    units = gram[idx][:, idx] / (nv[:, None] * nv[None, :])  # Gram matrix of the unit vectors
    a = torch.tensor([alphas[i] for i in valid], dtype=torch.float64)
    a = a / a.sum()

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ units @ c), 0.0))

    c = a.clone()  # m = sum_k c_k u_k
    mean_norm = norm(c)
    if mean_norm < tol:
        c = torch.zeros_like(a)
        c[0] = 1.0
    else:
        c = c / mean_norm
    steps = 0
    for _ in range(max_iter):
        steps += 1
        dots = (units @ c).clamp(-1.0, 1.0)  # <m, u_k>
        theta = torch.arccos(dots)
        tangent = torch.zeros_like(c)
        for k in range(len(valid)):
            th = float(theta[k])
            if th < tol:
                continue
            factor = float(a[k]) * th / math.sin(th)
            tangent[k] += factor
            tangent -= factor * float(dots[k]) * c
        t_norm = norm(tangent)
        if t_norm < tol:
            break
        c = math.cos(t_norm) * c + math.sin(t_norm) * tangent / t_norm
        c_norm = norm(c)
        if c_norm > tol:
            c = c / c_norm
    out = [0.0] * n
    for k, i in enumerate(valid):
        out[i] = scale * float(c[k]) / float(nv[k])  # u_i = x_i / n_i
    return out, steps


def karcher(inputs: MergeInputs, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    x = inputs.models
    n = x.shape[0]
    if n == 1:
        return x[0]
    flat = x.reshape(n, -1)
    coefficients, steps = karcher_coefficients(gram_matrix(flat), max_iter, tol)
    out = inputs.output_buffer().zero_()
    for i, c in enumerate(coefficients):
        if c != 0.0:
            out.add_(x[i], alpha=c)
    inputs.stats["tensors"] = 1.0
    inputs.stats["iterations"] = float(steps)
    return out


def summarize_karcher(totals: dict[str, float], refs: list[str], context: object = None) -> dict:
    tensors = totals.get("tensors", 0.0)
    mean = totals.get("iterations", 0.0) / tensors if tensors else 0.0
    return {"mean_iterations": mean, "lines": [f"  {mean:.2f} Karcher iterations per tensor on average"]}


register(
    MergeMethod(
        name="karcher",
        fn=karcher,
        params=(
            Param("max_iter", 10, kind=int, doc="most fixed-point iterations per tensor"),
            Param("tol", 1e-5, doc="stop when the tangent step is shorter; smaller norms are dropped"),
        ),
        base="unused",
        summary="Riemannian (Karcher) mean of the models' directions, times their mean norm",
        paper="arXiv:2603.04972",
        min_models=1,
        elementwise=False,  # angles over the whole tensor
        summarize=summarize_karcher,
    )
)
