"""The numba kernels behind ``weightsmith.ops.fused`` (imported on first use, so that numba's
import and cache loading cost nothing to merges that never call them)."""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from weightsmith.ops.fused_blocks import BLOCK

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
def _task_vectors(models, base, bits, want_hist, want_stats, hist, fstats, istats):  # pragma: no cover
    n_models, n = models.shape
    for b in prange((n + BLOCK - 1) // BLOCK):
        t = numba.get_thread_id()
        lo = b * BLOCK
        hi = min(lo + BLOCK, n)
        if want_stats:
            fstats[b, 0] = _sumsq(base[lo:hi])
        for i in range(n_models):
            row = models[i, lo:hi]
            if want_stats:
                fstats[b, 1 + i] = _sumsq(row)
            nonzero = 0
            for j in range(lo, hi):
                d = models[i, j] - base[j]
                models[i, j] = d
                nonzero += d != 0
            if want_stats:
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

@njit(cache=True, nogil=True)
def _trim_and_weigh(delta, lo, size, keep_lo, keep_hi, weight, kept, sq_kept):  # pragma: no cover
    # The first sweep of both combines, model by model over the block [lo, lo + size):
    # entries outside the band [keep_lo, keep_hi] -> 0 (NaN is kept, and reported later);
    # kept[i] and sq_kept[i] of the trimmed values; then weighted = trimmed * w_i, their
    # running total (from 0, in model order) and whether any is positive / negative.
    # Model-major sweeps: each inner loop is branch-free and vectorizes; the block's scratch
    # stays in cache. Returns (weighted, total, pos, neg).
    n_models = delta.shape[0]
    weighted = np.empty((n_models, size), dtype=np.float32)
    total = np.zeros(size, dtype=np.float32)
    pos = np.zeros(size, dtype=np.bool_)
    neg = np.zeros(size, dtype=np.bool_)
    zero = np.float32(0.0)
    for i in range(n_models):
        k_lo = keep_lo[i]
        k_hi = keep_hi[i]
        count = 0
        for j in range(size):
            d = delta[i, lo + j]
            a = abs(d)
            d = zero if (a < k_lo or a > k_hi) else d
            count += d != 0
            weighted[i, j] = d
        kept[i] = count
        sq_kept[i] = _sumsq_f32(weighted[i])
        w_i = weight[i]  # x * 1 == x exactly, so unit weights need no special case
        for j in range(size):
            w = weighted[i, j] * w_i
            weighted[i, j] = w
            total[j] += w
            pos[j] |= w > 0
            neg[j] |= w < 0
    return weighted, total, pos, neg


@njit(parallel=True, cache=True, nogil=True)
def _combine(
    delta, base, keep_lo, keep_hi, weight, lam, scale, normalize, consensus, plain_div,
    out, fstats, istats,
):  # pragma: no cover
    n_models, n = delta.shape
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for b in prange((n + BLOCK - 1) // BLOCK):
        lo = b * BLOCK
        hi = min(lo + BLOCK, n)
        size = hi - lo
        weighted, total, pos, neg = _trim_and_weigh(
            delta, lo, size, keep_lo, keep_hi, weight, istats[b], fstats[b]
        )
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
    delta, base, thr, no_limit, weight, majority, aggregation, lam, scale, out, fstats, istats
):  # pragma: no cover
    n_models, n = delta.shape
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for b in prange((n + BLOCK - 1) // BLOCK):
        lo = b * BLOCK
        hi = min(lo + BLOCK, n)
        size = hi - lo
        # (the total's zero sign differs from the torch path's T_0 + T_1 + ..., but only its
        # comparisons with 0 are used)
        trimmed, total, pos, neg = _trim_and_weigh(
            delta, lo, size, thr, no_limit, weight, istats[b], fstats[b]
        )
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


def num_threads() -> int:
    return numba.get_num_threads()


def set_num_threads(n: int) -> None:
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
