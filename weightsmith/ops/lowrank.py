"""Low-rank factorisation of weight differences: truncated SVD, rank from energy, errors.

Pure functions on one matrix at a time (float32 in, float32 out); ``extract-lora`` calls them
per tensor. A difference ``delta`` (``out x in``) becomes LoRA factors ``B`` (``out x r``) and
``A`` (``r x in``) with ``B @ A`` the best rank-r approximation in the Frobenius norm
(Eckart–Young). The singular values are split evenly, ``B = U sqrt(S)``, ``A = sqrt(S) Vh``, so
both factors have the same scale (better conditioned if the adapter is trained further).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SVD_METHODS = ("exact", "randomized")


@dataclass
class LowRank:
    """``b @ a`` approximates the matrix; ``singular_values`` are all of them (exact) or the
    leading ``rank + oversampling`` (randomized)."""

    b: torch.Tensor
    a: torch.Tensor
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """All singular values of a matrix, descending, in float32."""
    return torch.linalg.svdvals(delta.float())


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """The smallest rank k whose leading singular values keep ``energy`` of ``sum(s**2)``.

    ``energy`` is a fraction in (0, 1]; 1 gives the numerical rank (all nonzero values). A zero
    matrix has rank 0.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    power = s.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 0
    kept = torch.cumsum(power, 0) / total
    # a tolerance of a few float64 ulps so energy=1.0 is not missed by rounding in the cumsum
    k = int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1
    return min(k, int((s > 0).sum().item()))


def truncated_svd(
    delta: torch.Tensor, rank: int, method: str = "exact", *, oversample: int = 8, niter: int = 4
) -> LowRank:
    """The rank-``rank`` factors of ``delta`` (float32).

    ``exact``: ``torch.linalg.svd`` (LAPACK gesdd), optimal. ``randomized``: Halko et al.'s range
    finder (``torch.svd_lowrank``, ``rank + oversample`` columns, ``niter`` power iterations):
    cheaper for ``rank << min(shape)``, slightly worse when the spectrum decays slowly.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}; one of {', '.join(SVD_METHODS)}")
    m = delta.float()
    full = min(m.shape)
    rank = max(0, min(rank, full))
    if method == "randomized" and rank + oversample < full:
        u, s, v = torch.svd_lowrank(m, q=rank + oversample, niter=niter)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    b = (u[:, :rank] * root).contiguous()
    a = (root[:, None] * vh[:rank]).contiguous()
    return LowRank(b, a, s)


def relative_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """``||delta - b @ a||_F / ||delta||_F`` (0 for a zero delta approximated by zero)."""
    d = delta.float()
    norm = float(torch.linalg.matrix_norm(d))
    if norm == 0.0:
        return 0.0 if b.numel() == 0 or float(b.abs().max()) == 0 else math.inf
    return float(torch.linalg.matrix_norm(d - b @ a)) / norm


def tail_error(s: torch.Tensor, rank: int) -> float:
    """The relative error of the best rank-``rank`` approximation, from all singular values."""
    power = s.double() ** 2
    total = float(power.sum())
    return math.sqrt(float(power[rank:].sum()) / total) if total else 0.0
