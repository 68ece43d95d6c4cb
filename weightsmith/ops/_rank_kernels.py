"""The numba kernel behind ``weightsmith.ops.row_ranks``: the stable ascending rank of every
entry of a float32 row, in linear time (imported on first use, as ``_kernels.py``).

Each float32 bit pattern is mapped to a uint32 key whose unsigned order is torch's sort order
(negatives flipped, -0.0 made +0.0 so that the two tie, every NaN the largest key so that NaNs
come last and tie). A least-significant-digit radix sort is stable, so equal keys keep their
positions: the ranks are exactly those of ``torch.argsort(x, stable=True)``. Rows of up to
``SHORT`` entries are ranked by counting instead (the histograms would cost more than the row).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

SHORT = 32  # rows up to this length: the O(n^2) count beats 8 radix passes
ROWS_PER_ITEM = 16  # rows per parallel work item (one scratch allocation each)


@njit(cache=True, nogil=True, inline="always")
def _key(bits):  # pragma: no cover
    b = np.int64(bits)  # 0 .. 2^32 - 1
    if (b & 0x7FFFFFFF) > 0x7F800000:  # NaN, any sign or payload
        return np.int64(0xFFFFFFFF)
    if b == 0x80000000:  # -0.0 ties with +0.0
        b = np.int64(0)
    if b & 0x80000000:
        return b ^ 0xFFFFFFFF  # negatives: larger magnitude, smaller key
    return b | 0x80000000


@njit(cache=True, nogil=True)
def _rank_short_row(bits, out):  # pragma: no cover
    # rank_j = #{i : k_i < k_j} + #{i < j : k_i == k_j}
    n = bits.shape[0]
    for j in range(n):
        kj = _key(bits[j])
        r = 0
        for i in range(n):
            ki = _key(bits[i])
            r += (ki < kj) | ((ki == kj) & (i < j))
        out[j] = np.float32(r)


@njit(cache=True, nogil=True, inline="always")
def _rank_row(bits, out, keys, keys2, idx, idx2, hist, digit_bits, passes):  # pragma: no cover
    # hist: [passes, 2^digit_bits] scratch, passes * digit_bits >= 32 (the key bits). Inlined where it is
    # called with literal digit_bits and passes, so that they compile as constants (unrolled
    # histogram updates, constant shifts: ~1.5x faster than runtime values, measured).
    n = bits.shape[0]
    radix = 1 << digit_bits
    hist[:, :] = 0
    for j in range(n):
        k = _key(bits[j])
        keys[j] = k
        for p in range(passes):
            hist[p, (k >> (p * digit_bits)) & (radix - 1)] += 1
    # A pass whose digit is the same in every key moves nothing: skip it. The first pass that
    # moves reads positions as j (no index array to fill); the last writes ranks directly.
    moving = np.empty(passes, dtype=np.bool_)
    last = -1
    for p in range(passes):
        moving[p] = hist[p, (np.int64(keys[0]) >> (p * digit_bits)) & (radix - 1)] != n
        if moving[p]:
            last = p
    if last < 0:  # all keys equal: ranks are positions
        for j in range(n):
            out[j] = np.float32(j)
        return
    first = True
    src_k, src_i, dst_k, dst_i = keys, idx, keys2, idx2
    for p in range(last + 1):
        if not moving[p]:
            continue
        shift = p * digit_bits
        h = hist[p]
        total = 0
        for d in range(radix):  # exclusive prefix sums: each digit's first slot
            c = h[d]
            h[d] = total
            total += c
        if p == last:
            for j in range(n):
                d = (np.int64(src_k[j]) >> shift) & (radix - 1)
                slot = h[d]
                h[d] = slot + 1
                out[j if first else src_i[j]] = np.float32(slot)
            return
        for j in range(n):
            k = src_k[j]
            d = (np.int64(k) >> shift) & (radix - 1)
            slot = h[d]
            h[d] = slot + 1
            dst_k[slot] = k
            dst_i[slot] = j if first else src_i[j]
        first = False
        src_k, src_i, dst_k, dst_i = dst_k, dst_i, src_k, src_i


@njit(parallel=True, cache=True, nogil=True)
def row_ranks(bits, out):  # pragma: no cover
    """out[r, j] = stable ascending rank of the float32 with bit pattern bits[r, j] in row r.

    ``bits``: C-contiguous uint32 [rows, n] (a float32 array viewed as uint32); ``out``: float32
    of the same shape. Rows are independent, so results do not depend on the thread count.
    """
    rows, n = bits.shape
    for item in prange((rows + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM):
        lo = item * ROWS_PER_ITEM
        hi = min(lo + ROWS_PER_ITEM, rows)
        if n <= SHORT:
            for r in range(lo, hi):
                _rank_short_row(bits[r], out[r])
            continue
        keys = np.empty(n, dtype=np.uint32)
        keys2 = np.empty(n, dtype=np.uint32)
        idx = np.empty(n, dtype=np.int32)
        idx2 = np.empty(n, dtype=np.int32)
        # Histograms about as long as the row, so that clearing them and their prefix sums cost
        # about one pass; 3 x 11 bits measured faster than 4 x 8 on 2048-long rows (2 x 16
        # thrashes L1).
        if n >= 1024:
            hist = np.empty((3, 1 << 11), dtype=np.int32)
            for r in range(lo, hi):
                _rank_row(bits[r], out[r], keys, keys2, idx, idx2, hist, 11, 3)
        elif n >= 128:
            hist = np.empty((4, 1 << 8), dtype=np.int32)
            for r in range(lo, hi):
                _rank_row(bits[r], out[r], keys, keys2, idx, idx2, hist, 8, 4)
        else:
            hist = np.empty((8, 1 << 4), dtype=np.int32)
            for r in range(lo, hi):
                _rank_row(bits[r], out[r], keys, keys2, idx, idx2, hist, 4, 8)
