"""Fused CPU kernels (numba) for the inner loop of the sparse task-vector family.

The torch path of TIES runs some thirty tensor-wide operations per tensor (task vectors, norms,
magnitudes, histogram keys, masks, weighting, sign election, agreement, sums, division), each a
full pass over memory with a temporary of its own: about 0.45 s for an 11.5M-element tensor of
three models on two cores. Here the same arithmetic is three passes:

1. ``task_vectors_``: delta_i = theta_i - theta_0 in place, the report's input statistics, and
   the histogram of the top 16 bits of every |delta_i| (the first radix-selection level);
2. ``refine_histograms``: the next 16 bits inside each model's boundary bucket (exact
   thresholds, as ``engine.selection``);
3. ``combine_into``: keep-band, weighting, sign election, agreement, the (normalized) sum,
   lambda, the base, and the report's output statistics, written into the output buffer.

Every float32 operation is the one the torch path performs, in the same order, so outputs are
bit-identical to it (tests/test_fused.py); the report's sums of squares are accumulated in
float64 per block of coordinates, so they agree with the torch path's to rounding. Work is split
in fixed blocks of coordinates, so results never depend on the thread count.

numba is a dependency; where it cannot be imported (or ``WEIGHTSMITH_FUSED=0``) the torch path
runs instead. Compiled kernels are cached on disk (numba's ``cache=True``), so only the first
merge on a machine pays the compilation (a few seconds).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

BLOCK = 1 << 15  # coordinates per parallel work item: fixed, so results do not depend on threads
BUCKETS = 1 << 16
MIN_NUMEL = 1 << 14  # below this the torch path is as fast and skips the histogram set-up

try:  # pragma: no cover - exercised on every machine that has numba
    import numba
    from numba import njit, prange

    _IMPORTED = True
except ImportError:  # pragma: no cover
    _IMPORTED = False


def available() -> bool:
    """Whether the fused kernels run (numba importable and not disabled by WEIGHTSMITH_FUSED=0)."""
    return _IMPORTED and os.environ.get("WEIGHTSMITH_FUSED", "1") != "0"


def usable(delta: torch.Tensor) -> bool:
    """Whether the kernels apply to this [N, ...] float tensor (CPU float32, big enough)."""
    return (
        available()
        and delta.device.type == "cpu"
        and delta.dtype == torch.float32
        and delta[0].numel() >= MIN_NUMEL
    )


if _IMPORTED:
    # Sums of squares are report numbers, not outputs: they may be reassociated (vectorized),
    # but NaN/Inf must still propagate (they flag bad inputs), so only "reassoc".
    # Everything that produces output values is compiled without fast-math, in the torch
    # path's order of operations.
    REASSOC = {"reassoc"}

    @njit(fastmath=REASSOC, cache=True, nogil=True)
    def _sumsq(x):  # pragma: no cover
        acc = 0.0
        for j in range(x.shape[0]):
            y = np.float64(x[j])
            acc += y * y
        return acc

    @njit(fastmath=REASSOC, cache=True, nogil=True)
    def _sumsq_f32(x):  # pragma: no cover
        # Squares rounded to float32 first, as torch's (d * d).sum(dtype=float64).
        acc = 0.0
        for j in range(x.shape[0]):
            acc += np.float64(x[j] * x[j])
        return acc

    @njit(parallel=True, cache=True, nogil=True)
    def _task_vectors(models, base, bits, want_hist, hist, fstats, istats):  # pragma: no cover
        n_models, n = models.shape
        for b in prange((n + BLOCK - 1) // BLOCK):
            t = numba.get_thread_id()
            lo = b * BLOCK
            hi = min(lo + BLOCK, n)
            fstats[b, 0] = _sumsq(base[lo:hi])
            for i in range(n_models):
                row = models[i, lo:hi]
                fstats[b, 1 + i] = _sumsq(row)
                nonzero = 0
                for j in range(lo, hi):
                    d = models[i, j] - base[j]
                    models[i, j] = d
                    nonzero += d != 0
                fstats[b, 1 + n_models + i] = _sumsq(row)
                istats[b, i] = nonzero
                if want_hist[i]:
                    for j in range(lo, hi):
                        hist[t, i, (bits[i, j] & 0x7FFFFFFF) >> 16] += 1

    @njit(parallel=True, cache=True, nogil=True)
    def _refine(bits, rows, digits, hist):  # pragma: no cover
        n = bits.shape[1]
        for b in prange((n + BLOCK - 1) // BLOCK):
            t = numba.get_thread_id()
            lo = b * BLOCK
            hi = min(lo + BLOCK, n)
            for s in range(rows.shape[0]):
                i = rows[s]
                top = digits[s]
                for j in range(lo, hi):
                    key = bits[i, j] & 0x7FFFFFFF
                    if (key >> 16) == top:
                        hist[t, s, key & 0xFFFF] += 1

    @njit(parallel=True, cache=True, nogil=True)
    def _combine(
        delta, base, keep_lo, keep_hi, weight, unit, lam, scale, normalize, consensus, plain_div,
        out, fstats, istats,
    ):  # pragma: no cover
        n_models, n = delta.shape
        zero = np.float32(0.0)
        one = np.float32(1.0)
        for b in prange((n + BLOCK - 1) // BLOCK):
            lo = b * BLOCK
            hi = min(lo + BLOCK, n)
            size = hi - lo
            # Model-major sweeps over one block of coordinates: each inner loop is branch-free
            # and vectorizes; the block's scratch stays in cache.
            weighted = np.empty((n_models, size), dtype=np.float32)
            total = np.zeros(size, dtype=np.float32)
            pos = np.zeros(size, dtype=np.bool_)
            neg = np.zeros(size, dtype=np.bool_)
            for i in range(n_models):
                k_lo = keep_lo[i]
                k_hi = keep_hi[i]
                w_i = weight[i]
                kept = 0
                for j in range(size):
                    d = delta[i, lo + j]
                    a = abs(d)
                    # Outside the band -> 0; written so that NaN is kept (and reported later).
                    d = zero if (a < k_lo or a > k_hi) else d
                    kept += d != 0
                    weighted[i, j] = d
                istats[b, i] = kept
                fstats[b, i] = _sumsq_f32(weighted[i])
                for j in range(size):
                    w = weighted[i, j] if unit else weighted[i, j] * w_i
                    weighted[i, j] = w
                    total[j] += w
                    pos[j] |= w > 0
                    neg[j] |= w < 0
            conflict = 0
            active = 0
            for j in range(size):
                conflict += pos[j] & neg[j]
                active += pos[j] | neg[j]
            istats[b, n_models] = conflict
            istats[b, n_models + 1] = active
            res = out[lo:hi]
            if consensus:
                elected = 0
                for j in range(size):
                    elected += (total[j] >= 0) & (pos[j] | neg[j])
                istats[b, n_models + 2] = elected
                merged = np.zeros(size, dtype=np.float32)
                divisor = np.zeros(size, dtype=np.float32)
                for i in range(n_models):
                    w_i = weight[i]
                    for j in range(size):
                        w = weighted[i, j]
                        agree = (w > 0) if total[j] >= 0 else (w < 0)
                        merged[j] += w if agree else zero
                        divisor[j] += w_i if agree else zero
                for j in range(size):
                    m = merged[j]
                    if normalize:
                        m = m / (one if divisor[j] == 0 else divisor[j])
                    res[j] = m * lam if scale else m
            else:
                for j in range(size):
                    m = total[j] / plain_div if normalize else total[j]
                    res[j] = m * lam if scale else m
            fstats[b, n_models] = _sumsq(res)
            for j in range(size):
                res[j] = base[lo + j] + res[j]
            fstats[b, n_models + 1] = _sumsq(res)


def _blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def _threads() -> int:
    return numba.get_num_threads()


def task_vectors_(
    models: torch.Tensor, base: torch.Tensor, histograms: list[bool], stats: dict[str, float]
) -> list[torch.Tensor | None]:
    """delta_i = models[i] - base in place, with the report's input statistics.

    Returns, for each model with ``histograms[i]``, the 65536-bucket int64 histogram of the top
    16 bits of |delta_i| as float32 keys (radix selection's first level), else None.
    """
    n_models = models.shape[0]
    n = base.numel()
    flat = models.reshape(n_models, n).numpy()
    nb = _blocks(n)
    hist = np.zeros((_threads(), n_models, BUCKETS), dtype=np.int64)
    fstats = np.zeros((nb, 1 + 2 * n_models))
    istats = np.zeros((nb, n_models), dtype=np.int64)
    want = np.array(histograms, dtype=np.bool_)
    _task_vectors(flat, base.reshape(n).numpy(), flat.view(np.int32), want, hist, fstats, istats)
    f = fstats.sum(0)
    counts = istats.sum(0)
    stats["numel"] = float(n)
    stats["sq_base"] = float(f[0])
    for i in range(n_models):
        stats[f"sq_model[{i}]"] = float(f[1 + i])
    for i in range(n_models):
        stats[f"sq_tv[{i}]"] = float(f[1 + n_models + i])
        stats[f"nonzero_tv[{i}]"] = float(counts[i])
    summed = hist.sum(0)
    return [torch.from_numpy(summed[i]) if histograms[i] else None for i in range(n_models)]


def refine_histograms(delta: torch.Tensor, selections: list[tuple[int, int]]) -> list[torch.Tensor]:
    """For each selection (model i, top digit): the histogram of the low 16 bits of the
    |delta_i| keys whose top 16 bits equal that digit (radix selection's second level)."""
    if not selections:
        return []
    n_models = delta.shape[0]
    flat = delta.reshape(n_models, -1).numpy()
    hist = np.zeros((_threads(), len(selections), BUCKETS), dtype=np.int64)
    rows = np.array([i for i, _ in selections], dtype=np.int64)
    digits = np.array([d for _, d in selections], dtype=np.int32)
    _refine(flat.view(np.int32), rows, digits, hist)
    return list(torch.from_numpy(hist.sum(0)))


def combine_into(
    out: torch.Tensor,
    delta: torch.Tensor,
    base: torch.Tensor,
    keep: list[tuple[float, float]],
    weight: list[float],
    lam: float,
    normalize: bool,
    consensus: bool,
    stats: dict[str, float],
) -> torch.Tensor:
    """``sparsify.combine`` fused, with entries outside the magnitude band ``keep[i]`` = (lo, hi)
    of model i treated as trimmed (lo <= |delta_i| <= hi is kept; NaN is kept)."""
    n_models = delta.shape[0]
    n = base.numel()
    nb = _blocks(n)
    f32 = np.float32
    wsum = sum(weight)
    fstats = np.zeros((nb, n_models + 2))
    istats = np.zeros((nb, n_models + 3), dtype=np.int64)
    _combine(
        delta.reshape(n_models, n).numpy(),
        base.reshape(n).numpy(),
        np.array([k[0] for k in keep], dtype=f32),
        np.array([k[1] for k in keep], dtype=f32),
        np.array(weight, dtype=f32),
        all(w == 1 for w in weight),
        f32(lam),
        lam != 1,
        normalize,
        consensus,
        f32(1.0 if abs(wsum) < 1e-8 else wsum),
        out.reshape(n).numpy(),
        fstats,
        istats,
    )
    f = fstats.sum(0)
    c = istats.sum(0)
    for i in range(n_models):
        stats[f"kept[{i}]"] = float(c[i])
        stats[f"sq_kept[{i}]"] = float(f[i])
    stats["conflict"], stats["active"] = float(c[n_models]), float(c[n_models + 1])
    if consensus:
        stats["elected_pos"] = float(c[n_models + 2])
        stats["elected_neg"] = stats["active"] - stats["elected_pos"]
    stats["sq_delta_out"] = float(f[n_models])
    stats["sq_out"] = float(f[n_models + 1])
    return out


def set_threads(n: int) -> Any:
    """Use ``n`` kernel threads (clamped to numba's pool); returns the previous count."""
    if not _IMPORTED:
        return None
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    return previous

