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

from weightsmith.ops.tsv import thin_svd

SVD_METHODS = ("exact", "randomized")
RANDOMIZED_SEED = 0  # the range finder's Gaussian test matrix


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
        # A fixed seed on the matrix's own generator: the same factors on every run (and the
        # same bytes on the CPU and the cpu-staged device), the caller's random state untouched.
        with torch.random.fork_rng(devices=[m.device] if m.is_cuda else []):
            if m.is_cuda:
                with torch.cuda.device(m.device):
                    torch.cuda.manual_seed(RANDOMIZED_SEED)
            else:
                torch.random.default_generator.manual_seed(RANDOMIZED_SEED)
            u, s, v = torch.svd_lowrank(m, q=rank + oversample, niter=niter)
        vh = v.T
    else:
        u, s, vh = thin_svd(m)  # float64 retry where LAPACK does not converge
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
    # The residual in place in the product's buffer: one matrix-sized temporary, not two.
    return float(torch.linalg.matrix_norm((b @ a).sub_(d))) / norm


def tail_error(s: torch.Tensor, rank: int) -> float:
    """The relative error of the best rank-``rank`` approximation, from all singular values."""
    power = s.double() ** 2
    total = float(power.sum())
    return math.sqrt(float(power[rank:].sum()) / total) if total else 0.0


# Peak-memory model of factoring one difference (extract-lora's ``_factor``), in float32 copies.
# Measured peak RSS growth, one thread, bytes per element (tests/test_lora_budget.py measures it):
# exact 1024^2 30.8, 2048^2 24.4, 2048x512 21.2, 512x2048 16.7, 4096x1024 23.1; randomized
# (rank 64-128) 1024^2 7.8, 2048^2 7.2, 4096x512 9.8. The model below, times the margin, is
# 50, 45, 31, 31, 31 and 12.8, 11.4, 16.0.
_MARGIN_NUM, _MARGIN_DEN = 5, 4


def factor_peak_bytes(
    shape: tuple[int, ...], rank: int, method: str, read_itemsizes: tuple[int, int] = (4, 4)
) -> int:
    """Bytes one ``truncated_svd`` of a ``shape`` difference holds at its peak, the difference
    itself included, with a margin: reading (the float32 difference plus the raw second input),
    then either LAPACK's exact SVD (its copy of the matrix, U, V^T and the gesdd workspace, with
    the difference and the factors alive) or the randomized range finder (``rank + oversample``
    columns; the residual of ``relative_error`` is one more matrix)."""
    m, n = int(shape[0]), int(shape[1])
    numel, k = m * n, min(m, n)
    ft_item, bs_item = read_itemsizes
    reading = 4 * numel + numel * max(bs_item, 0 if ft_item == 4 else ft_item, 1)
    if method == "randomized" and rank + 8 < k:
        floats = 2 * numel + 4 * (m + n) * (rank + 8)
    else:
        floats = 3 * numel + 2 * (m + n) * k + 3 * k * k
    return max(reading, 4 * floats) * _MARGIN_NUM // _MARGIN_DEN


def compare_peak_bytes(numel: int, read_itemsizes: tuple[int, int]) -> int:
    """Bytes of a tensor that is compared (or copied whole) rather than factored: both raw
    inputs at once, with the same margin."""
    return numel * sum(read_itemsizes) * _MARGIN_NUM // _MARGIN_DEN
