"""Task Singular Vectors merge (TSV-M): low-rank task vectors with decorrelated singular vectors.

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri & Rodola, "Task Singular Vectors:
Reducing Task Interference in Model Merging", CVPR 2025 (arXiv 2412.00081); reference code
github.com/AntoAndGar/task_singular_vectors (``compute_and_sum_svd_mem_reduction``), also
FusionBench's ``TaskSingularVectorMerging``.

Per 2-D tensor, with task vectors tau_t = w_t (theta_t - theta_0), t = 1..T, and k = min(m, n):

1. each task's SVD tau_t = U_t S_t V_t^T, truncated to its top r = floor(k * rank_fraction)
   directions (rank_fraction 1/T by default, so the T pieces together fill rank k);
2. U = [U_1,r .. U_T,r], S = [S_1,r .. S_T,r], V = [V_1,r .. V_T,r] concatenated;
3. U and V orthogonalised by their polar factor (the nearest matrix with orthonormal columns,
   the Procrustes solution): svd(U) = P Sigma Q^T, U_orth = P Q^T; likewise V_orth;
4. delta = U_orth diag(S) V_orth^T, and theta = theta_0 + alpha * delta.

Tensors that are not matrices (norms, biases, conv kernels), and matrices with
``spectral: false``, take the mean of the task vectors, as the reference does:
theta = theta_0 + alpha * mean_t tau_t.

Parameters: ``weight`` (per model, default 1: scales tau_t before the SVD, as FusionBench's
list-valued alpha), ``alpha`` (default 1, the paper's setting), ``rank_fraction`` (default 0,
meaning 1/T), ``spectral`` (default true; set false by filter for matrices the reference
excludes, e.g. CLIP's ``text_projection``).

Differences from the reference (docs/methods/spectral.md): the reference places the pieces in
zero-padded k-wide matrices; we concatenate only the T r kept columns, which gives the same
product (a zero column's polar direction meets a zero singular value). Where floor(k / T) is 0
(more tasks than the matrix's smaller side) the reference keeps nothing and leaves the tensor at
the base; we keep one direction per task. Directions whose singular value is zero (below
matrix_rank's tolerance) are dropped before the orthogonalisation: the reference keeps them,
and their arbitrary directions then tilt the other tasks' (rank-deficient task vectors only,
such as LoRA deltas; full-rank inputs are unaffected).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from weightsmith.errors import MergeError
from weightsmith.ops.param_checks import check_fraction
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, TensorSpec, register


def thin_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(x, full_matrices=False)``; where LAPACK's divide-and-conquer driver does
    not converge (it can on matrices with many repeated singular values, e.g. concatenated bases
    of nearly identical task vectors), once more in float64, cast back. The retry needs one
    float64 copy of ``x`` and its factors beyond the declared scratch; it is rare (seen once on
    synthetic checkpoints whose task vectors are i.i.d. noise)."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        if x.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(x.to(torch.float64), full_matrices=False)
        return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def svd_failed(inputs: MergeInputs, method: str, err: Exception) -> MergeError:
    """The message for a matrix whose SVD did not converge even in float64."""
    return MergeError(
        f"{method}: tensor {inputs.name!r} {list(inputs.base.shape) if inputs.base is not None else ''}: "
        f"the SVD did not converge in float32 nor float64 ({err}); the task vectors are probably "
        "degenerate (e.g. identical fine-tunes or NaN-like values). Merge this tensor another way: "
        "a `filter:`-ed parameter or a per-tensor method such as task_arithmetic"
    )


def polar_factor(x: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns (rows, if wide) nearest to ``x``: P Q^T."""
    p, _, qh = thin_svd(x)
    return p @ qh


def svd_dtype(x: torch.Tensor) -> torch.dtype:
    # LAPACK has no half-precision SVD; float64 inputs (dtype: float64 recipes) stay float64.
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def weighted_task_vectors_(inputs: MergeInputs, weight: list[float]) -> torch.Tensor:
    """tau_t = w_t (theta_t - theta_0), stacked, computed in place over ``inputs.models``."""
    assert inputs.base is not None
    tau = inputs.models.sub_(inputs.base.unsqueeze(0))
    for i, w in enumerate(weight):
        if w != 1.0:
            tau[i].mul_(w)
    return tau


def task_rank(k: int, n_tasks: int, rank_fraction: float) -> int:
    """Directions kept per task: floor(k * fraction), fraction 1/T by default, at least one."""
    fraction = rank_fraction if rank_fraction > 0 else 1.0 / n_tasks
    return min(k, max(1, int(k * fraction)))


def numerical_rank(s: torch.Tensor, shape: tuple[int, ...]) -> int:
    """Singular values above max(s) * max(m, n) * eps (torch.linalg.matrix_rank's tolerance)."""
    if s.numel() == 0:
        return 0
    tol = float(s[0]) * max(shape) * torch.finfo(s.dtype).eps
    return int((s > tol).sum())


def tsv_delta(tau: torch.Tensor, rank_fraction: float = 0.0) -> torch.Tensor:
    """The TSV-M merged task vector of stacked matrices ``tau`` [T, m, n] (not scaled by alpha)."""
    n_tasks, m, n = tau.shape
    r = task_rank(min(m, n), n_tasks, rank_fraction)
    dtype = svd_dtype(tau)
    # The kept pieces go straight into preallocated U and V (a list and a cat would hold them
    # twice at the peak).
    u_cat = torch.empty(m, n_tasks * r, dtype=dtype, device=tau.device)
    v_cat = torch.empty(n, n_tasks * r, dtype=dtype, device=tau.device)
    s_cat = torch.empty(n_tasks * r, dtype=dtype, device=tau.device)
    filled = 0
    for t in range(n_tasks):
        # One task's full thin SVD at a time; only its top r directions are kept, and of those
        # only the ones with a nonzero singular value: the directions LAPACK picks for a zero
        # singular value are arbitrary, and would tilt the other tasks' directions in the
        # orthogonalisation (a rank-16 LoRA delta, or a task at weight 0).
        u, s, vh = thin_svd(tau[t].to(dtype))
        keep = min(r, numerical_rank(s, (m, n)))
        u_cat[:, filled:filled + keep] = u[:, :keep]
        v_cat[:, filled:filled + keep] = vh[:keep].T
        s_cat[filled:filled + keep] = s[:keep]
        filled += keep
        del u, s, vh
    if filled == 0:
        return torch.zeros(m, n, dtype=tau.dtype, device=tau.device)
    u_orth = polar_factor(u_cat[:, :filled]).mul_(s_cat[:filled])
    del u_cat
    v_orth = polar_factor(v_cat[:, :filled])
    del v_cat
    return (u_orth @ v_orth.T).to(tau.dtype)


def spectral_merge(
    inputs: MergeInputs,
    weight: list[float],
    alpha: float,
    spectral: bool,
    delta_fn: Callable[[torch.Tensor], torch.Tensor],
    method: str,
) -> torch.Tensor:
    """The frame tsv, iso_c and iso_cts share: weighted task vectors, ``delta_fn`` on each 2-D
    tensor (the mean elsewhere, or with ``spectral: false``), base + alpha * delta."""
    assert inputs.base is not None
    if alpha == 0:
        # The base bit for bit (also its signed zeros), and no SVD.
        return inputs.output_buffer().copy_(inputs.base)
    tau = weighted_task_vectors_(inputs, weight)
    if spectral and inputs.base.dim() == 2:
        try:
            delta = delta_fn(tau)
        except torch.linalg.LinAlgError as err:
            raise svd_failed(inputs, method, err) from err
        inputs.stats["svd_matrices"] = 1.0
    else:
        delta = tau.mean(0)
    return inputs.output_buffer().copy_(delta).mul_(alpha).add_(inputs.base)


def tsv(
    inputs: MergeInputs,
    weight: list[float],
    alpha: float = 1.0,
    rank_fraction: float = 0.0,
    spectral: bool = True,
) -> torch.Tensor:
    return spectral_merge(inputs, weight, alpha, spectral, lambda tau: tsv_delta(tau, rank_fraction), "tsv")


def check_rank_fraction(tensors: list[TensorSpec], dtype: torch.dtype) -> None:
    check_fraction(
        tensors, "rank_fraction", "tsv",
        meaning="the share of each task's singular directions kept (0: 1 / number of models)",
    )


def svd_scratch(n_models: int, dtype: torch.dtype) -> int:
    """Bytes per element of one matrix besides the engine's slot: the kept U and V pieces and
    one LAPACK SVD at a time (its copy of the input, U, V^T and workspace). Peak RSS growth
    measured on 1024 x 1024 float32 with 2 and 4 tasks, 8 hash seeds: at most 8.5 copies, and
    17.2 when every SVD is redone in float64 (``thin_svd``'s retry where LAPACK does not
    converge); 22 declared (``compute_bound``: on glibc's heap, fragmentation had reached 12.3)."""
    return 22 * max(torch.finfo(dtype).bits // 8, 4)


register(
    MergeMethod(
        name="tsv",
        fn=tsv,
        params=(
            Param("weight", 1.0, per_model=True, doc="scales this task vector before the SVD"),
            Param("alpha", 1.0, doc="scale of the merged task vector"),
            Param("rank_fraction", 0.0, doc="share of each task's singular directions kept; 0 = 1/T"),
            Param("spectral", True, kind=bool, doc="false: mean of task vectors for this matrix"),
        ),
        base="required",
        summary="base + alpha * (per-task top-k/T SVDs, singular vectors orthogonalised, rebuilt)",
        paper="arXiv:2412.00081",
        elementwise=False,  # an SVD needs the whole matrix
        scratch_per_element=svd_scratch,
        compute_bound=True,
        prepare=check_rank_fraction,
    )
)
