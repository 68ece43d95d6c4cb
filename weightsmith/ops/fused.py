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

import math
import os
from typing import Any

import numpy as np
import torch

BLOCK = 1 << 13  # coordinates per parallel work item: fixed, so results do not depend on threads
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


    @njit(parallel=True, cache=True, nogil=True)
    def _elected_sign_sum(delta, thr, weight):  # pragma: no cover
        n_models, n = delta.shape
        nb = (n + BLOCK - 1) // BLOCK
        partial = np.zeros(nb, dtype=np.int64)
        zero = np.float32(0.0)
        for b in prange(nb):
            lo = b * BLOCK
            hi = min(lo + BLOCK, n)
            total = np.empty(hi - lo, dtype=np.float32)
            for i in range(n_models):
                t_i = thr[i]
                w_i = weight[i]
                for j in range(hi - lo):
                    d = delta[i, lo + j]
                    t = (zero if abs(d) < t_i else d) * w_i
                    total[j] = t if i == 0 else total[j] + t
            acc = 0
            for j in range(hi - lo):
                acc += (total[j] > 0) - (total[j] < 0)
            partial[b] = acc
        return partial.sum()

    @njit(parallel=True, cache=True, nogil=True)
    def _model_combine(
        delta, base, thr, weight, majority, aggregation, lam, scale, out, fstats, istats
    ):  # pragma: no cover
        n_models, n = delta.shape
        zero = np.float32(0.0)
        one = np.float32(1.0)
        for b in prange((n + BLOCK - 1) // BLOCK):
            lo = b * BLOCK
            hi = min(lo + BLOCK, n)
            size = hi - lo
            trimmed = np.empty((n_models, size), dtype=np.float32)
            total = np.empty(size, dtype=np.float32)
            pos = np.zeros(size, dtype=np.bool_)
            neg = np.zeros(size, dtype=np.bool_)
            for i in range(n_models):
                t_i = thr[i]
                kept = 0
                for j in range(size):
                    d = delta[i, lo + j]
                    d = zero if abs(d) < t_i else d
                    kept += d != 0
                    trimmed[i, j] = d
                istats[b, i] = kept
                fstats[b, i] = _sumsq(trimmed[i])
                w_i = weight[i]
                for j in range(size):
                    t = trimmed[i, j] * w_i
                    trimmed[i, j] = t
                    total[j] = t if i == 0 else total[j] + t
                    pos[j] |= t > 0
                    neg[j] |= t < 0
            conflict = 0
            active = 0
            elected = 0
            positive = np.empty(size, dtype=np.bool_)
            for j in range(size):
                g = total[j]
                p = g > 0 or (g == 0 and majority > 0)
                positive[j] = p
                conflict += pos[j] & neg[j]
                act = pos[j] | neg[j]
                active += act
                elected += p & act
            istats[b, n_models] = conflict
            istats[b, n_models + 1] = active
            istats[b, n_models + 2] = elected
            merged = np.zeros(size, dtype=np.float32)
            count = np.zeros(size, dtype=np.float32)
            for i in range(n_models):
                for j in range(size):
                    t = trimmed[i, j]
                    sel = (t > 0) if positive[j] else (t < 0)
                    if aggregation == 2:
                        v = abs(t) if sel else zero
                        merged[j] = v if v > merged[j] else merged[j]
                    else:
                        merged[j] += t if sel else zero
                        count[j] += one if sel else zero
            res = out[lo:hi]
            for j in range(size):
                m = merged[j]
                if aggregation == 0:
                    m = m / (count[j] if count[j] > one else one)
                elif aggregation == 2:
                    g = total[j]
                    gamma = one if g > 0 else (-one if g < 0 else np.float32(majority))
                    m = m * gamma
                if scale:
                    m = m * lam
                res[j] = m + base[lo + j]
            fstats[b, n_models + 1] = _sumsq(res)
            for j in range(size):
                merged[j] = res[j] - base[lo + j]
            fstats[b, n_models] = _sumsq(merged)


def _blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def in_place_scratch(n_models: int, dtype: torch.dtype) -> int | None:
    """Per-element scratch of a method whose fused path works in place, where the kernels run
    (float32): one float32 per element, for the allocator's slack around the histograms and
    the blocks' temporaries (measured, tests/test_memory_budget.py). Elsewhere the engine's
    default (``MergeMethod.scratch_per_element``)."""
    return 4 if available() and dtype == torch.float32 else None


def _count_dtype(n: int) -> Any:
    # Per-thread histograms: uint32 counts halve their memory whenever they cannot overflow.
    return np.uint32 if n < 2**32 else np.int64


def selection_bytes(selections: int) -> int:
    """Peak histogram memory of exact selection for this many (model, rank) selections, for the
    engine's budget: per level, the per-thread uint32 histograms and their int64 sum, and at
    most two levels' (or a pending total and a new level's) alive at once."""
    threads = _threads() if _IMPORTED else 1
    return 2 * selections * BUCKETS * (4 * threads + 8)


def _threads() -> int:
    return numba.get_num_threads()


def new_histograms(rows: int, numel: int) -> np.ndarray:
    """Per-thread histogram accumulators for ``rows`` selections over ``numel`` keys, to pass as
    ``into`` to the functions below across the row blocks of one tensor (no per-block
    allocation: the blocks of a split tensor reuse one buffer), then ``sum_histograms``."""
    return np.zeros((_threads(), rows, BUCKETS), dtype=_count_dtype(numel))


def sum_histograms(hist: np.ndarray) -> list[torch.Tensor]:
    return list(torch.from_numpy(hist.sum(0, dtype=np.int64)))


def task_vectors_(
    models: torch.Tensor,
    base: torch.Tensor,
    histograms: list[bool],
    stats: dict[str, float],
    into: np.ndarray | None = None,
) -> list[torch.Tensor | None]:
    """delta_i = models[i] - base in place, with the report's input statistics.

    Returns, for each model with ``histograms[i]``, the 65536-bucket int64 histogram of the top
    16 bits of |delta_i| as float32 keys (radix selection's first level), else None. With
    ``into`` (from ``new_histograms(n_models, ...)``) the counts are added there instead and
    nothing is returned.
    """
    n_models = models.shape[0]
    n = base.numel()
    flat = models.reshape(n_models, n).numpy()
    nb = _blocks(n)
    if into is not None:
        hist = into
    elif any(histograms):
        hist = new_histograms(n_models, n)
    else:
        hist = np.zeros((1, 1, 1), dtype=np.uint32)
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
    if into is not None or not any(histograms):
        return [None] * n_models
    summed = sum_histograms(hist)
    return [summed[i] if histograms[i] else None for i in range(n_models)]


def refine_histograms(
    delta: torch.Tensor, selections: list[tuple[int, int]], into: np.ndarray | None = None
) -> list[torch.Tensor]:
    """For each selection (model i, top digit): the histogram of the low 16 bits of the
    |delta_i| keys whose top 16 bits equal that digit (radix selection's second level).
    With ``into`` (``new_histograms(len(selections), ...)``) the counts are added there."""
    if not selections:
        return []
    n_models = delta.shape[0]
    flat = delta.reshape(n_models, -1).numpy()
    hist = into if into is not None else new_histograms(len(selections), flat.shape[1])
    rows = np.array([i for i, _ in selections], dtype=np.int64)
    digits = np.array([d for _, d in selections], dtype=np.int32)
    _refine(flat.view(np.int32), rows, digits, hist)
    return [] if into is not None else sum_histograms(hist)


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



AGGREGATION_CODES = {"dis-mean": 0, "dis-sum": 1, "dis-max": 2}


def subtract_(models: torch.Tensor, base: torch.Tensor, stats: dict[str, float]) -> None:
    """delta_i = models[i] - base in place, with the input statistics (no histograms)."""
    task_vectors_(models, base, [False] * models.shape[0], stats)


def elected_sign_sum(delta: torch.Tensor, thresholds: list[float], weight: list[float]) -> int:
    """Sum over coordinates of sign(sum_i w_i [|delta_i| >= thr_i] delta_i), exactly (TIES'
    model-wide majority sign). ``thresholds``: 0 where a task is not trimmed."""
    n_models = delta.shape[0]
    return int(
        _elected_sign_sum(
            delta.reshape(n_models, -1).numpy(),
            np.array(thresholds, dtype=np.float32),
            np.array(weight, dtype=np.float32),
        )
    )


def ties_model_combine_into(
    out: torch.Tensor,
    delta: torch.Tensor,
    base: torch.Tensor,
    thresholds: list[float],
    weight: list[float],
    majority: int,
    aggregation: str,
    lam: float,
    stats: dict[str, float],
) -> torch.Tensor:
    """The output pass of TIES ``scope: model`` (ops/ties.py ``_apply_model_scope``), fused."""
    n_models = delta.shape[0]
    n = base.numel()
    nb = _blocks(n)
    fstats = np.zeros((nb, n_models + 2))
    istats = np.zeros((nb, n_models + 3), dtype=np.int64)
    _model_combine(
        delta.reshape(n_models, n).numpy(),
        base.reshape(n).numpy(),
        np.array(thresholds, dtype=np.float32),
        np.array(weight, dtype=np.float32),
        majority,
        AGGREGATION_CODES[aggregation],
        np.float32(lam),
        lam != 1,
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
    stats["elected_pos"] = float(c[n_models + 2])
    stats["elected_neg"] = stats["active"] - stats["elected_pos"]
    stats["sq_delta_out"] = float(f[n_models])
    stats["sq_out"] = float(f[n_models + 1])
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel now, on a tiny input, so that the
    first real tensor does not pay for it (and memory measurements see only tensor memory)."""
    if not available():
        return
    delta = torch.ones(1, 8)
    base = torch.zeros(8)
    out = torch.empty(8)
    scratch: dict[str, float] = {}
    task_vectors_(delta, base, [True], scratch)
    refine_histograms(delta, [(0, 0)])
    combine_into(out, delta, base, [(0.0, math.inf)], [1.0], 0.5, True, True, scratch)
    combine_into(out, delta, base, [(0.0, math.inf)], [1.0], 1.0, True, False, scratch)
    elected_sign_sum(delta, [0.0], [1.0])
    ties_model_combine_into(out, delta, base, [0.0], [1.0], 1, "dis-mean", 1.0, scratch)
