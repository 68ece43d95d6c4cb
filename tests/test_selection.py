"""Exact k-th largest |x|: in memory (kthvalue or radix) and streamed (RadixSelect) equal
torch.kthvalue on the flattened vector, ties, zeros and all."""

import pytest
import torch

from weightsmith.ops.selection import (
    KTHVALUE_MAX_NUMEL,
    RadixSelect,
    kth_largest_abs,
    kth_largest_abs_rows,
    magnitude_keys,
)


def expected(x: torch.Tensor, k: int) -> float:
    flat = x.reshape(-1).double().abs() if x.dtype == torch.float64 else x.reshape(-1).float().abs()
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


def streamed(x: torch.Tensor, k: int, chunk: int, dtype: torch.dtype = torch.float32) -> float:
    sel = RadixSelect(dtype)
    chunks = x.reshape(-1).split(chunk)
    while not sel.done:
        sel.absorb(sum(sel.counts(c) for c in chunks), k if sel.level == 0 else None)
    return sel.value


def populations() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bf16 = (0.01 * torch.randn(20_011, generator=g)).to(torch.bfloat16)  # many ties
    with_zeros = 0.01 * torch.randn(9_001, generator=g)
    with_zeros[::3] = 0.0
    with_zeros[1::7] = -0.0
    odd = torch.tensor([0.0, -1e-45, 1e-45, 3.0, -3.0, float("inf"), -2.5, 1e-38, 3.0])
    return {
        "float32": torch.randn(10_007, generator=g),
        "bf16": bf16,
        "bf16_delta": (bf16.float() - (bf16.float() + 0.002 * torch.randn(20_011, generator=g))
                       .to(torch.bfloat16).float()),
        "zeros": with_zeros,
        "all_zero": torch.zeros(1000),
        "constant": torch.full((777,), -0.5),
        "subnormal_inf": odd,
        "float64": torch.randn(5_003, generator=g, dtype=torch.float64) * 1e-3,
        "fp16": (torch.randn(4_001, generator=g)).to(torch.float16),
    }


@pytest.mark.parametrize("name", list(populations()))
def test_every_method_equals_kthvalue(name):
    x = populations()[name]
    n = x.numel()
    ks = sorted({1, 2, 3, n // 7 + 1, n // 2, n - 1, n} - {0})
    for k in ks:
        want = expected(x, k)
        for method in ("radix", "kthvalue", "auto"):
            assert kth_largest_abs(x, k, method) == want, (name, k, method)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        for chunk in (max(1, n // 5), n):
            assert streamed(x, k, chunk, dtype) == want, (name, k, chunk)


def test_streamed_selection_does_not_depend_on_the_split():
    g = torch.Generator().manual_seed(1)
    x = (0.02 * torch.randn(50_000, generator=g)).to(torch.bfloat16).float()
    k = 12_345
    values = {streamed(x, k, c) for c in (50_000, 4096, 997)}
    # and on the order of the chunks
    perm = x[torch.randperm(x.numel(), generator=g)]
    values.add(streamed(perm, k, 7777))
    assert values == {expected(x, k)}


def test_float64_takes_four_levels_and_float32_two():
    assert RadixSelect(torch.float64).levels == 4
    assert RadixSelect(torch.float32).levels == 2
    # float64 values that round to the same float32: only 64-bit keys separate them
    x = torch.tensor([1.0, 1.0 + 2**-40, 1.0 + 2**-41, 0.5], dtype=torch.float64)
    assert kth_largest_abs(x, 1, "radix") == 1.0 + 2**-40
    assert kth_largest_abs(x, 2, "radix") == 1.0 + 2**-41
    assert streamed(x, 2, 2, torch.float64) == 1.0 + 2**-41


def test_large_tensor_uses_radix_and_agrees():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(KTHVALUE_MAX_NUMEL * 2 + 5, generator=g)
    for k in (1, 1000, x.numel() // 3, x.numel()):
        assert kth_largest_abs(x, k) == expected(x, k)


def test_magnitude_keys_are_monotone_in_the_magnitude():
    x = torch.tensor([0.0, 1e-45, 1e-38, 0.1, 1.0, 3e38, float("inf")])
    keys = magnitude_keys(-x)
    assert torch.all(keys[1:] > keys[:-1])


def test_rows_equal_per_row_kthvalue():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 5, 64, generator=g)).to(torch.bfloat16).float()
    for k in (1, 10, 64):
        got = kth_largest_abs_rows(x, k)
        want = torch.stack([
            torch.stack([torch.kthvalue(r.abs(), 64 - k + 1).values for r in plane]) for plane in x
        ]).unsqueeze(-1)
        assert torch.equal(got, want)


def test_bad_rank_is_an_error():
    x = torch.randn(10)
    for k in (0, 11, -1):
        with pytest.raises(ValueError, match="k must be in"):
            kth_largest_abs(x, k)
    sel = RadixSelect()
    with pytest.raises(ValueError, match="needs k"):
        sel.absorb(sel.counts(x))
    with pytest.raises(ValueError, match="k must be in"):
        sel.absorb(sel.counts(x), 11)
