"""Selection: which entries of a task vector survive (magnitude top-k, a magnitude band, or a
random drop), as ranks and then as band values.

Selection keeps every element whose magnitude equals a kept one ("ties at the threshold are
kept"): the kept set is mergekit's exactly-k set plus the elements tied with its smallest
member, so it never depends on sort order (see docs/methods/sparse.md for how much differs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from weightsmith.ops.registry import MergeInputs
from weightsmith.ops.selection import kth_largest_abs, kth_largest_abs_rows


def magnitude_count(density: float, n: int) -> int:
    """mergekit's k for magnitude pruning: floor(density * n), at least one element."""
    return max(1, int(density * n))


@dataclass(frozen=True)
class MagnitudeBand:
    """Which entries of one task vector survive a magnitude trim, as selection ranks.

    Kept: |x| >= the ``lo``-th largest |x| (None: no lower bound) and |x| <= the ``hi``-th
    largest (None: no upper bound); ``empty`` keeps nothing. Ranks, not values, so the torch
    path and the fused kernels (ops/fused.py) select the same entries from one definition.
    """

    lo: int | None = None
    hi: int | None = None
    empty: bool = False

    @property
    def trims(self) -> bool:
        return self.empty or self.lo is not None or self.hi is not None


def magnitude_band(density: float, n: int) -> MagnitudeBand:
    """TIES' trim: keep |x| >= the k-th largest |x|, k = max(1, floor(density n))."""
    if density >= 1 or n == 0:
        return MagnitudeBand()
    return MagnitudeBand(lo=magnitude_count(density, n))


def breadcrumbs_band(density: float, gamma: float, n: int) -> MagnitudeBand:
    """Breadcrumbs per tensor (mergekit's magnitude_outliers).

    mergekit sorts |x| ascending and keeps positions [n_bot, n_bot + n_keep) with
    n_keep = floor(density n), n_top = floor(gamma n), n_bot = max(0, n - n_keep - n_top), i.e.
    it drops the n_top largest (fewer when density + gamma > 1) and the smallest. Here the kept
    band is by value: lo <= |x| <= hi, lo and hi being the smallest and largest magnitudes that
    exact selection keeps, so tied magnitudes share one fate.
    """
    if density >= 1 or n == 0:
        return MagnitudeBand()
    n_keep = int(density * n)
    if n_keep == 0:
        return MagnitudeBand(empty=True)
    n_bot = max(0, n - n_keep - int(gamma * n))
    # ascending positions n_bot (lo) and n_bot + n_keep - 1 (hi), as k-th largest ranks
    return MagnitudeBand(lo=n - n_bot, hi=n - (n_bot + n_keep - 1))


def trim_magnitude_(delta: torch.Tensor, density: float) -> None:
    """Zero all but the largest-|x| entries, in place: keep |x| >= the k-th largest |x|."""
    band = magnitude_band(density, delta.numel())
    if band.lo is None:
        return
    mag = delta.abs()
    thr = kth_largest_abs(mag, band.lo, magnitudes=True)
    # Multiplying by the boolean keep-mask is ~1.5x faster than masked_fill_ on the CPU, and
    # exact: x * 1 = x, x * 0 = +-0 (a signed zero is still zero to every later step).
    delta.mul_(mag >= thr)


def trim_band_(delta: torch.Tensor, density: float, gamma: float) -> None:
    """Breadcrumbs per tensor, in place (see ``breadcrumbs_band``)."""
    band = breadcrumbs_band(density, gamma, delta.numel())
    if band.empty:
        delta.zero_()
        return
    if not band.trims:
        return
    assert band.lo is not None and band.hi is not None
    mag = delta.abs()
    hi = kth_largest_abs(mag, band.hi)
    lo = kth_largest_abs(mag, band.lo)
    delta.masked_fill_((mag < lo) | (mag > hi), 0)


def trim_band_rows_(delta: torch.Tensor, density: float, gamma: float) -> None:
    """Breadcrumbs per row, as the paper's code (TaskVectorMiddleKeep), in place.

    For each row r along the last dimension (length d; a 1-D tensor is one row; scalars are
    kept): remove the floor(gamma d) largest |x|, then keep the next floor(density d). By value:
    keep hi_r >= |x| >= lo_r, with hi_r the (floor(gamma d) + 1)-th largest and lo_r the
    min(d, floor(gamma d) + floor(density d))-th largest |x| of the row.
    """
    if delta.dim() == 0 or (density >= 1 and gamma <= 0):
        return
    d = delta.shape[-1]
    n_top = int(gamma * d)
    n_keep = int(density * d)
    if n_keep == 0 or n_top >= d:
        delta.zero_()
        return
    mag = delta.abs()
    hi = kth_largest_abs_rows(delta, n_top + 1)
    lo = kth_largest_abs_rows(delta, min(d, n_top + n_keep))
    delta.masked_fill_((mag < lo) | (mag > hi), 0)


def drop_random_(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> None:
    """DARE's drop: zero each entry independently with probability 1 - density, in place.

    Uniforms come from ``generator`` only, so the mask is a function of the seed and the tensor
    name alone (the engine never splits random methods into row blocks).
    """
    if density >= 1:
        return
    u = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=delta.device)
    delta.masked_fill_(u >= density, 0)


def model_generators(inputs: MergeInputs, n: int) -> list[torch.Generator | None]:
    """One generator per model, seeded from the tensor's generator.

    So model i's mask depends on the seed, the tensor name and i, not on the other models'
    densities (a model at density 1 draws nothing).
    """
    if inputs.generator is None:
        return [None] * n
    seeds = torch.randint(0, 2**62, (n,), generator=inputs.generator, device=inputs.generator.device)
    out: list[torch.Generator | None] = []
    for s in seeds.tolist():
        g = torch.Generator(device=inputs.generator.device)
        g.manual_seed(int(s))
        out.append(g)
    return out


def _ranks(band: MagnitudeBand) -> list[int]:
    return [r for r in (band.lo, band.hi) if r is not None]


def band_values(band: MagnitudeBand, value: Callable[[int], float]) -> tuple[float, float]:
    """(lo, hi) magnitudes of a band, given the k-th largest |x| for its ranks."""
    if band.empty:
        return (math.inf, math.inf)  # |x| < inf for every finite x: nothing kept
    lo = value(band.lo) if band.lo is not None else 0.0
    hi = value(band.hi) if band.hi is not None else math.inf
    return (lo, hi)


class TensorBands(dict):
    """Per-tensor band values found by ``TensorBandStatistics``: name -> [(lo, hi)] per model."""


def keep_band_(delta: torch.Tensor, lo: float, hi: float) -> None:
    """Zero the entries with |x| outside [lo, hi], in place."""
    if lo > 0 or hi < math.inf:
        mag = delta.abs()
        delta.masked_fill_((mag < lo) | (mag > hi), 0)
