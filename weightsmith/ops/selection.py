"""Exact k-th largest magnitude, in memory or over a stream of tensors, in linear time.

The magnitude |x| of a float is non-negative, and for non-negative IEEE floats the bit pattern
read as a signed integer is monotone in the value (+0 < subnormals < normals < inf < NaN). So
the k-th largest |x| is the k-th largest integer key, and an MSD radix selection finds it
exactly: count the top 16 bits of every key in 65536 buckets (``torch.bincount``), find the
bucket that holds the k-th key from the top, then count the next 16 bits of the keys inside
that bucket, and so on. float32 keys take two levels, float64 keys four. bf16 and fp16 values
are widened to float32 first, which is exact.

* In memory (``kth_largest_abs``): each level keeps only the keys of the chosen bucket, so the
  work is one histogram of all n keys plus ones of a few thousand; no sort.
* Streamed (``RadixSelect``): the population (e.g. every tensor of a model) is never held at
  once; each level is one pass that feeds every chunk to ``counts`` and sums the histograms,
  then ``absorb`` fixes 16 more bits. Histograms are integers, so the result does not depend
  on chunking or order.

The result equals ``torch.kthvalue(|x|.flatten(), n - k + 1)`` (ties, zeros and all).
"""

from __future__ import annotations

import torch

DIGIT_BITS = 16
BUCKETS = 1 << DIGIT_BITS
# Up to this many elements torch.kthvalue (one quickselect) beats the histogram levels, whose
# 65536-bucket bincounts cost ~0.2 ms each. Measured on 2 CPU cores (docs/methods/sparse.md):
# 64k elements 0.9 ms vs 1.2 ms; 256k 4.0 ms vs 0.9 ms; 4M 88 ms vs 20 ms.
KTHVALUE_MAX_NUMEL = 1 << 16


def _key_dtype(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype, int]:
    """(float dtype the magnitudes are taken in, integer view dtype, number of 16-bit levels)."""
    if dtype == torch.float64:
        return torch.float64, torch.int64, 4
    return torch.float32, torch.int32, 2


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """|x| as order-preserving integer keys (int32 for <= 32-bit floats, int64 for float64)."""
    fdt, idt, _ = _key_dtype(x.dtype)
    mag = x.abs() if x.dtype == fdt else x.to(fdt).abs_()
    return mag.reshape(-1).view(idt)


def _key_to_value(key: int, dtype: torch.dtype) -> float:
    fdt, idt, _ = _key_dtype(dtype)
    return float(torch.tensor([key], dtype=idt).view(fdt).item())


def _pick_digit(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The digit holding the rank-th largest key, and the rank within that digit's bucket."""
    from_top = counts.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)).item())
    above = int(from_top[i - 1].item()) if i > 0 else 0
    return BUCKETS - 1 - i, rank - above


def _check_rank(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} elements, got {k}")


def kth_largest_abs(x: torch.Tensor, k: int, method: str = "auto", *, magnitudes: bool = False) -> float:
    """Exact k-th largest |x| over all elements of ``x`` (k = 1 is the maximum).

    ``method``: ``kthvalue`` (torch quickselect), ``radix`` (histogram levels) or ``auto``
    (kthvalue up to ``KTHVALUE_MAX_NUMEL`` elements, radix above, by measurement).
    ``magnitudes=True`` says ``x`` already holds |values| (float32 or float64), saving a copy.
    """
    n = x.numel()
    _check_rank(k, n)
    if method == "auto":
        method = "kthvalue" if n <= KTHVALUE_MAX_NUMEL else "radix"
    fdt, idt, levels = _key_dtype(x.dtype)
    if method == "kthvalue":
        mag = x.reshape(-1).to(fdt).abs()
        return float(torch.kthvalue(mag, n - k + 1).values.item())
    if method != "radix":
        raise ValueError(f"unknown selection method {method!r}")
    if magnitudes and x.dtype == fdt and x.is_contiguous():
        keys = x.reshape(-1).view(idt)
    else:
        keys = magnitude_keys(x)
    rank = k
    prefix = 0
    for level in range(levels):
        shift = DIGIT_BITS * (levels - 1 - level)
        digits = (keys >> shift) & (BUCKETS - 1) if level else keys >> shift
        # One bincount over all keys: torch.bincount has a large per-call cost on big inputs
        # (~30 ms for 1M keys vs ~0.25 s for 50M), so slicing the first level is slower.
        digit, rank = _pick_digit(torch.bincount(digits, minlength=BUCKETS), rank)
        prefix = (prefix << DIGIT_BITS) | digit
        if level + 1 < levels:
            # Keep only the keys in the chosen bucket: a tiny fraction after the first level.
            keys = keys[digits == digit]
        del digits
    return _key_to_value(prefix, x.dtype)


def kth_largest_abs_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest |x| of each row along the last dimension, shape ``x.shape[:-1] + (1,)``.

    Rows are short (a hidden size), so one batched quickselect is the fast way here.
    """
    d = x.shape[-1]
    _check_rank(k, d)
    fdt, _, _ = _key_dtype(x.dtype)
    return torch.kthvalue(x.to(fdt).abs(), d - k + 1, dim=-1, keepdim=True).values


class RadixSelect:
    """Streamed exact k-th largest |x| over a population seen in chunks, one pass per level.

    Each pass: call ``counts(chunk)`` on every chunk (in any order, on any split of the
    population), add the histograms, and hand the sum to ``absorb``. The first ``absorb`` also
    takes ``k`` (it may depend on the population size, which is ``first_histogram.sum()``).
    After ``levels`` passes ``done`` is true and ``value`` is the exact k-th largest |x|.
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        _, _, self.levels = _key_dtype(dtype)
        self.level = 0
        self.prefix = 0
        self.rank: int | None = None
        self.population: int | None = None

    @property
    def done(self) -> bool:
        return self.level == self.levels

    @property
    def value(self) -> float:
        if not self.done:
            raise RuntimeError("RadixSelect.value read before every level was absorbed")
        return _key_to_value(self.prefix, self.dtype)

    def counts(self, x: torch.Tensor) -> torch.Tensor:
        """Histogram (int64, 65536 buckets) of this level's digit among keys under the prefix."""
        if self.done:
            raise RuntimeError("RadixSelect.counts called after the selection finished")
        keys = magnitude_keys(x.to(self.dtype) if x.dtype != self.dtype else x)
        shift = DIGIT_BITS * (self.levels - 1 - self.level)
        if self.level == 0:
            digits = keys >> shift
        else:
            inside = (keys >> (shift + DIGIT_BITS)) == self.prefix
            digits = keys[inside]
            digits = (digits >> shift) & (BUCKETS - 1) if shift else digits & (BUCKETS - 1)
        return torch.bincount(digits, minlength=BUCKETS).cpu()

    def absorb(self, counts: torch.Tensor, k: int | None = None) -> None:
        """End of a pass: fix this level's digit. ``k`` is required on the first call."""
        if self.level == 0:
            if k is None:
                raise ValueError("RadixSelect.absorb needs k on the first level")
            self.population = int(counts.sum().item())
            _check_rank(k, self.population)
            self.rank = k
        assert self.rank is not None
        digit, self.rank = _pick_digit(counts, self.rank)
        self.prefix = (self.prefix << DIGIT_BITS) | digit
        self.level += 1
