"""numba.cuda kernels behind ``weightsmith.ops.cuda_fused`` (imported on first use).

The same source runs on a GPU (launched on torch CUDA tensors or CuPy arrays, through the CUDA
array interface) and under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, on numpy arrays),
which is how CI checks it against the CPU fused kernels (ops/_kernels.py) bit for bit.

Layout: CUDA block ``b`` owns the coordinates ``[b * chunk, (b + 1) * chunk)``; its ``THREADS``
threads take them strided (coalesced). Every output coordinate is computed by one thread, over
the models in index order, with the float32 operations of the CPU kernels in their order:

* multiplications go through ``mul`` (libdevice ``__fmul_rn``), which NVVM never contracts with
  a following add into an FMA. A plain ``*`` could be fused (NVVM's default is ``-fma=1`` and
  numba exposes no switch), and ``fma(a, b, c)`` rounds once where the CPU rounds twice;
* divisions are IEEE round-to-nearest (``fdiv_rn``; numba compiles without fast-math, so no
  flush-to-zero either: subnormals are kept, as on the CPU).

Reductions: histograms are integer atomics (exact, order-free); the report's sums of squares
are float64, summed by each thread in coordinate order, then across the block by a fixed tree
in shared memory, one partial per block (summed on the host in block order): the same bits
on every run, but not the CPU's bits (its float64 sums are vectorized with ``reassoc``, and the
device may fuse ``acc + y * y``); they agree to float64 rounding, ~1e-16 relative per term.
Counts (kept, active, conflicts, elected) are exact.

Under the simulator ``mul``/``div``/``float_bits`` are the IEEE definitions of the intrinsics
on numpy float32 scalars (the simulator has no libdevice), and ``THREADS`` defaults to 4
(Python threads; ``WEIGHTSMITH_CUDASIM_THREADS`` overrides it): the outputs do not depend on
it, only the float64 report sums' rounding does.
"""

from __future__ import annotations

import os

import numpy as np
from numba import config, cuda

SIMULATOR = bool(config.ENABLE_CUDASIM)
# Threads per block: a power of two (tree reductions). Fixed on a device, so cached kernels
# never meet a different value.
THREADS = int(os.environ.get("WEIGHTSMITH_CUDASIM_THREADS", "4")) if SIMULATOR else 256
if THREADS & (THREADS - 1) or THREADS < 1:
    raise ValueError(f"WEIGHTSMITH_CUDASIM_THREADS must be a power of two, got {THREADS}")
CACHE = not SIMULATOR
ONE = np.int64(1)  # histogram counts are int64 (torch has no uint64 arithmetic)
ABS_MASK = 0x7FFFFFFF

if SIMULATOR:

    def mul(a, b):  # pragma: no cover - replaced by libdevice on a device
        return np.float32(a) * np.float32(b)

    def div(a, b):  # pragma: no cover
        return np.float32(a) / np.float32(b)

    def float_bits(x):  # pragma: no cover
        return int(np.float32(x).view(np.int32))

else:  # pragma: no cover - needs a GPU
    from numba.cuda import libdevice

    mul = libdevice.fmul_rn
    div = libdevice.fdiv_rn
    float_bits = libdevice.float_as_int


def _device(fn):
    """A device function on a GPU; under the simulator the plain Python function (it shares
    the kernels' module globals, so ``cuda.*`` resolves to the simulator's thread state, and
    it skips the simulator's per-call module swap, the bulk of its cost)."""
    return fn if SIMULATOR else cuda.jit(device=True, cache=CACHE)(fn)


@_device
def _end(hi, n):  # pragma: no cover
    # (builtin min of two ints does not compile for CUDA in numba 0.68)
    return n if hi > n else hi


@_device
def _block_sum_f64(buf, t, value):  # pragma: no cover
    # Fixed tree over the block's threads: the same association on every run.
    buf[t] = value
    cuda.syncthreads()
    s = THREADS // 2
    while s > 0:
        if t < s:
            buf[t] += buf[t + s]
        cuda.syncthreads()
        s //= 2
    total = buf[0]
    cuda.syncthreads()  # before the buffer's next use
    return total


@_device
def _block_sum_i64(buf, t, value):  # pragma: no cover
    buf[t] = value
    cuda.syncthreads()
    s = THREADS // 2
    while s > 0:
        if t < s:
            buf[t] += buf[t + s]
        cuda.syncthreads()
        s //= 2
    total = buf[0]
    cuda.syncthreads()
    return total


@cuda.jit(cache=CACHE)
def task_vectors(models, base, want_hist, want_stats, chunk, hist, fstats, istats):  # pragma: no cover
    """delta_i = models[i] - base in place; per block: sum of squares of base, models and
    deltas (fstats[b] = [base, model_0.., delta_0..]) and nonzero deltas (istats[b]); the
    top-16-bit histogram of |delta_i| into hist[i] where want_hist[i]."""
    n_models = models.shape[0]
    n = models.shape[1]
    b = cuda.blockIdx.x
    t = cuda.threadIdx.x
    lo = b * chunk
    hi = _end(lo + chunk, n)
    fbuf = cuda.shared.array(THREADS, np.float64)
    ibuf = cuda.shared.array(THREADS, np.int64)
    if want_stats:
        acc = 0.0
        for j in range(lo + t, hi, THREADS):
            y = np.float64(base[j])
            acc += y * y
        total = _block_sum_f64(fbuf, t, acc)
        if t == 0:
            fstats[b, 0] = total
    for i in range(n_models):
        sq_model = 0.0
        sq_tv = 0.0
        nonzero = 0
        counting = want_hist[i] != 0
        for j in range(lo + t, hi, THREADS):
            m = models[i, j]
            d = m - base[j]
            models[i, j] = d
            ym = np.float64(m)
            sq_model += ym * ym
            yd = np.float64(d)
            sq_tv += yd * yd
            if d != 0:
                nonzero += 1
            if counting:
                cuda.atomic.add(hist, (i, (float_bits(d) & ABS_MASK) >> 16), ONE)
        if want_stats:
            total = _block_sum_f64(fbuf, t, sq_model)
            if t == 0:
                fstats[b, 1 + i] = total
            total = _block_sum_f64(fbuf, t, sq_tv)
            if t == 0:
                fstats[b, 1 + n_models + i] = total
            count = _block_sum_i64(ibuf, t, nonzero)
            if t == 0:
                istats[b, i] = count


@cuda.jit(cache=CACHE)
def refine(bits, rows, digits, chunk, hist):  # pragma: no cover
    """For each selection s: the low-16-bit histogram of the |delta_rows[s]| keys whose top 16
    bits equal digits[s] (radix selection's second level)."""
    n = bits.shape[1]
    lo = cuda.blockIdx.x * chunk
    hi = _end(lo + chunk, n)
    for s in range(rows.shape[0]):
        i = rows[s]
        top = digits[s]
        for j in range(lo + cuda.threadIdx.x, hi, THREADS):
            key = bits[i, j] & ABS_MASK
            if (key >> 16) == top:
                cuda.atomic.add(hist, (s, key & 0xFFFF), ONE)


@_device
def _trimmed(d, k_lo, k_hi):  # pragma: no cover
    # Outside the band [k_lo, k_hi] -> +0 (NaN compares false both ways: kept).
    a = abs(d)
    return np.float32(0.0) if (a < k_lo or a > k_hi) else d


@_device
def _kept_stats(delta, lo, hi, keep_lo, keep_hi, fbuf, ibuf, fstats, istats):  # pragma: no cover
    # kept[i] and sq_kept[i] (float64 of the float32 square, as the CPU) per block.
    t = cuda.threadIdx.x
    b = cuda.blockIdx.x
    for i in range(delta.shape[0]):
        count = 0
        sq = 0.0
        for j in range(lo + t, hi, THREADS):
            v = _trimmed(delta[i, j], keep_lo[i], keep_hi[i])
            if v != 0:
                count += 1
            sq += np.float64(mul(v, v))
        total = _block_sum_f64(fbuf, t, sq)
        kept = _block_sum_i64(ibuf, t, count)
        if t == 0:
            fstats[b, i] = total
            istats[b, i] = kept


@cuda.jit(cache=CACHE)
def combine(
    delta, base, keep_lo, keep_hi, weight, lam, scale, normalize, consensus, plain_div, chunk,
    out, fstats, istats,
):  # pragma: no cover
    """``ops.sparse.combine`` with the band trim (ops/_kernels.py ``_combine``), per coordinate."""
    n_models = delta.shape[0]
    n = delta.shape[1]
    b = cuda.blockIdx.x
    t = cuda.threadIdx.x
    lo = b * chunk
    hi = _end(lo + chunk, n)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    fbuf = cuda.shared.array(THREADS, np.float64)
    ibuf = cuda.shared.array(THREADS, np.int64)
    _kept_stats(delta, lo, hi, keep_lo, keep_hi, fbuf, ibuf, fstats, istats)
    conflict = 0
    active = 0
    elected = 0
    sq_delta = 0.0
    sq_out = 0.0
    for j in range(lo + t, hi, THREADS):
        total = zero  # from +0, in model order, as the CPU's zero-initialized running total
        pos = False
        neg = False
        for i in range(n_models):
            w = mul(_trimmed(delta[i, j], keep_lo[i], keep_hi[i]), weight[i])
            total = total + w
            pos = pos or w > 0
            neg = neg or w < 0
        if pos and neg:
            conflict += 1
        if pos or neg:
            active += 1
        if consensus:
            up = total >= 0
            if up and (pos or neg):
                elected += 1
            merged = zero
            divisor = zero
            for i in range(n_models):
                w_i = weight[i]
                w = mul(_trimmed(delta[i, j], keep_lo[i], keep_hi[i]), w_i)
                agree = (w > 0) if up else (w < 0)
                merged = merged + (w if agree else zero)
                divisor = divisor + (w_i if agree else zero)
            m = merged
            if normalize:
                m = div(m, one if divisor == 0 else divisor)
        else:
            m = div(total, plain_div) if normalize else total
        res = mul(m, lam) if scale else m
        y = np.float64(res)
        sq_delta += y * y
        o = base[j] + res
        out[j] = o
        y = np.float64(o)
        sq_out += y * y
    c = _block_sum_i64(ibuf, t, conflict)
    a = _block_sum_i64(ibuf, t, active)
    e = _block_sum_i64(ibuf, t, elected)
    sd = _block_sum_f64(fbuf, t, sq_delta)
    so = _block_sum_f64(fbuf, t, sq_out)
    if t == 0:
        istats[b, n_models] = c
        istats[b, n_models + 1] = a
        if consensus:
            istats[b, n_models + 2] = e
        fstats[b, n_models] = sd
        fstats[b, n_models + 1] = so


@cuda.jit(cache=CACHE)
def elected_sign_sum(delta, thr, weight, chunk, partial):  # pragma: no cover
    """partial[b] = sum over the block's coordinates of sign(sum_i w_i [|d_i| >= thr_i] d_i)."""
    n_models = delta.shape[0]
    n = delta.shape[1]
    b = cuda.blockIdx.x
    t = cuda.threadIdx.x
    lo = b * chunk
    hi = _end(lo + chunk, n)
    zero = np.float32(0.0)
    ibuf = cuda.shared.array(THREADS, np.int64)
    acc = 0
    for j in range(lo + t, hi, THREADS):
        total = zero
        for i in range(n_models):
            d = delta[i, j]
            v = mul(zero if abs(d) < thr[i] else d, weight[i])
            total = v if i == 0 else total + v  # from the first term, as the CPU
        if total > 0:
            acc += 1
        elif total < 0:
            acc -= 1
    s = _block_sum_i64(ibuf, t, acc)
    if t == 0:
        partial[b] = s


@cuda.jit(cache=CACHE)
def model_combine(
    delta, base, thr, no_limit, weight, majority, aggregation, lam, scale, chunk, out, fstats, istats,
):  # pragma: no cover
    """The output pass of TIES ``scope: model`` (ops/_kernels.py ``_model_combine``)."""
    n_models = delta.shape[0]
    n = delta.shape[1]
    b = cuda.blockIdx.x
    t = cuda.threadIdx.x
    lo = b * chunk
    hi = _end(lo + chunk, n)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    fbuf = cuda.shared.array(THREADS, np.float64)
    ibuf = cuda.shared.array(THREADS, np.int64)
    _kept_stats(delta, lo, hi, thr, no_limit, fbuf, ibuf, fstats, istats)
    conflict = 0
    active = 0
    elected = 0
    sq_delta = 0.0
    sq_out = 0.0
    for j in range(lo + t, hi, THREADS):
        total = zero
        pos = False
        neg = False
        for i in range(n_models):
            w = mul(_trimmed(delta[i, j], thr[i], no_limit[i]), weight[i])
            total = total + w
            pos = pos or w > 0
            neg = neg or w < 0
        positive = total > 0 or (total == 0 and majority > 0)
        if pos and neg:
            conflict += 1
        if pos or neg:
            active += 1
            if positive:
                elected += 1
        merged = zero
        count = zero
        for i in range(n_models):
            w = mul(_trimmed(delta[i, j], thr[i], no_limit[i]), weight[i])
            sel = (w > 0) if positive else (w < 0)
            if aggregation == 2:
                v = abs(w) if sel else zero
                merged = v if v > merged else merged
            else:
                merged = merged + (w if sel else zero)
                count = count + (one if sel else zero)
        m = merged
        if aggregation == 0:
            m = div(m, count if count > one else one)
        elif aggregation == 2:
            gamma = one if total > 0 else (-one if total < 0 else np.float32(majority))
            m = mul(m, gamma)
        if scale:
            m = mul(m, lam)
        res = m + base[j]
        out[j] = res
        y = np.float64(res)
        sq_out += y * y
        y = np.float64(res - base[j])
        sq_delta += y * y
    c = _block_sum_i64(ibuf, t, conflict)
    a = _block_sum_i64(ibuf, t, active)
    e = _block_sum_i64(ibuf, t, elected)
    sd = _block_sum_f64(fbuf, t, sq_delta)
    so = _block_sum_f64(fbuf, t, sq_out)
    if t == 0:
        istats[b, n_models] = c
        istats[b, n_models + 1] = a
        istats[b, n_models + 2] = e
        fstats[b, n_models] = sd
        fstats[b, n_models + 1] = so
