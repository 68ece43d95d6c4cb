"""Isotropic merging: ISO-C and ISO-CTS flatten the merged task vector's singular spectrum.

Marczak, Magistri, Cygert, Twardowski, Bagdanov & van de Weijer, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025 (arXiv 2502.04959);
reference code github.com/danielm1405/iso-merging (``src/utils/iso.py``), also FusionBench's
``ISO_C_Merge`` / ``ISO_CTS_Merge``.

With task vectors tau_t = w_t (theta_t - theta_0), t = 1..T, per 2-D tensor (k = min(m, n)):

* ``iso_c``: the sum M = sum_t tau_t = U S V^T; delta = mean(S) U V^T (every singular value
  replaced by their mean over all k), theta = theta_0 + alpha * delta.
* ``iso_cts``: the common subspace is M's top c directions, c = k - T d with
  d = round((k - floor(k * common_space_fraction)) / T) directions per task; each task adds the
  top d directions of its own residual tau_t - U_c U_c^T tau_t. The k collected left (and right)
  directions are orthogonalised by their polar factor (svd(X) = P Sigma Q^T, X_orth = P Q^T) and
  delta = mean(collected singular values) U_orth V_orth^T.

Tensors that are not matrices take the mean of the task vectors (both methods, as the
reference). Parameters: ``weight`` (per model, default 1), ``alpha`` (default 1; the authors
pick it on validation data in [0.1, 3]), ``common_space_fraction`` (iso_cts, default 0.8 as the
paper), ``spectral`` (default true; false merges a matrix by the mean, like 1-D tensors).

Differences from the reference (docs/methods/spectral.md): where the rounding would ask for
more task directions than k (tiny matrices with many tasks) we take d = floor(k / T) instead of
slicing with a negative common size. Directions of a zero singular value (below
torch.linalg.matrix_rank's tolerance) are left out, and the mean is over the kept values: the
reference keeps LAPACK's arbitrary directions there at weight mean(S) (rank-deficient task
vectors only, such as LoRA deltas; full-rank inputs are unaffected).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from weightsmith.ops.param_checks import check_fraction
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, TensorSpec, register
from weightsmith.ops.tsv import (
    numerical_rank,
    polar_factor,
    spectral_merge,
    svd_dtype,
    thin_svd,
)


def _task_sum(tau: torch.Tensor) -> torch.Tensor:
    total = tau[0].clone()
    for i in range(1, tau.shape[0]):
        total.add_(tau[i])
    return total




def iso_c_delta(tau: torch.Tensor) -> torch.Tensor:
    """ISO-C's merged task vector of stacked matrices ``tau`` [T, m, n] (not scaled by alpha)."""
    dtype = svd_dtype(tau)
    u, s, vh = thin_svd(_task_sum(tau).to(dtype))
    # Directions of a zero singular value are LAPACK's arbitrary choice: left out (full-rank
    # sums, the reference's case, keep all k).
    rank = numerical_rank(s, tuple(tau.shape[1:]))
    if rank == 0:
        return torch.zeros(tau.shape[1:], dtype=tau.dtype, device=tau.device)
    return (u[:, :rank].mul_(s[:rank].mean()) @ vh[:rank]).to(tau.dtype)


def subspace_sizes(k: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common directions c, directions per task d) with c + T d = k, as the reference."""
    common = int(k * common_space_fraction)
    # Python's round (half to even), as the reference, so the sizes match it exactly.
    per_task = round((k - common) / n_tasks)
    if per_task * n_tasks > k:
        per_task = k // n_tasks
    return k - per_task * n_tasks, per_task


def iso_cts_delta(tau: torch.Tensor, common_space_fraction: float = 0.8) -> torch.Tensor:
    """ISO-CTS's merged task vector of stacked matrices ``tau`` [T, m, n] (not scaled)."""
    n_tasks, m, n = tau.shape
    common, per_task = subspace_sizes(min(m, n), n_tasks, common_space_fraction)
    dtype = svd_dtype(tau)
    u, s, vh = thin_svd(_task_sum(tau).to(dtype))
    # Common directions first (the reference puts them last: the polar factor and a constant
    # spectrum make the order irrelevant). Zero singular values' directions are left out, as
    # in iso_c.
    common = min(common, numerical_rank(s, (m, n)))
    u_common = u[:, :common].clone()
    us, ss, vs = [u_common], [s[:common].clone()], [vh[:common].T.clone()]
    del u, s, vh
    for t in range(n_tasks if per_task else 0):
        # This task's part outside the common subspace, and its top directions.
        residual = tau[t].to(dtype)
        residual = residual - u_common @ (u_common.T @ residual)
        ut, st, vht = thin_svd(residual)
        keep = min(per_task, numerical_rank(st, (m, n)))
        us.append(ut[:, :keep].clone())
        ss.append(st[:keep].clone())
        vs.append(vht[:keep].T.clone())
        del residual, ut, st, vht
    s_cat = torch.cat(ss)
    if s_cat.numel() == 0:
        return torch.zeros(m, n, dtype=tau.dtype, device=tau.device)
    del u_common
    u_orth = polar_factor(torch.cat(us, 1))
    del us
    v_orth = polar_factor(torch.cat(vs, 1))
    del vs
    return (u_orth.mul_(s_cat.mean()) @ v_orth.T).to(tau.dtype)


def iso_c(
    inputs: MergeInputs, weight: list[float], alpha: float = 1.0, spectral: bool = True
) -> torch.Tensor:
    return spectral_merge(inputs, weight, alpha, spectral, iso_c_delta, "iso_c")


def iso_cts(
    inputs: MergeInputs,
    weight: list[float],
    alpha: float = 1.0,
    common_space_fraction: float = 0.8,
    spectral: bool = True,
) -> torch.Tensor:
    return spectral_merge(
        inputs, weight, alpha, spectral, lambda tau: iso_cts_delta(tau, common_space_fraction), "iso_cts"
    )


def _check_fraction(tensors: list[TensorSpec], dtype: torch.dtype) -> None:
    check_fraction(
        tensors, "common_space_fraction", "iso_cts",
        meaning="the share of directions taken from the summed task vector",
    )


def _scratch(copies: int) -> Callable[[int, torch.dtype], int]:
    def scratch(n_models: int, dtype: torch.dtype) -> int:
        return copies * max(torch.finfo(dtype).bits // 8, 4)

    return scratch


_SHARED = (
    Param("weight", 1.0, per_model=True, doc="scales this task vector before merging"),
    Param("alpha", 1.0, doc="scale of the merged task vector"),
)
_SPECTRAL = Param("spectral", True, kind=bool, doc="false: mean of task vectors for this matrix")

register(
    MergeMethod(
        name="iso_c",
        fn=iso_c,
        params=(*_SHARED, _SPECTRAL),
        base="required",
        summary="base + alpha * (sum of task vectors with its singular values set to their mean)",
        paper="arXiv:2502.04959",
        elementwise=False,  # an SVD needs the whole matrix
        # The sum and one LAPACK SVD (input copy, U, V^T, workspace): peak RSS growth measured
        # on 1024 x 1024 float32, 2 and 4 tasks, 8 hash seeds, at most 7.3 copies, and 16.1 when
        # the SVD is redone in float64 (thin_svd's retry where LAPACK does not converge); 21
        # declared.
        scratch_per_element=_scratch(21),
        compute_bound=True,
    )
)

register(
    MergeMethod(
        name="iso_cts",
        fn=iso_cts,
        params=(
            *_SHARED,
            Param("common_space_fraction", 0.8, doc="share of directions from the summed task vector"),
            _SPECTRAL,
        ),
        base="required",
        summary="iso_c over common directions plus each task's own residual directions",
        paper="arXiv:2502.04959",
        elementwise=False,
        # As iso_c, plus the collected U and V and one task's residual: measured at most 9.7
        # copies (1024 x 1024 float32, 2 and 4 tasks, 8 hash seeds), 18.3 with every SVD redone
        # in float64 and 21.7 once on the CI machine (a real retry: the polar factors of nearly
        # orthonormal columns fail to converge in float32 in about 2 runs of 30); 24 declared.
        scratch_per_element=_scratch(24),
        compute_bound=True,
        prepare=_check_fraction,
    )
)
