"""DELLA's per-row ranks: the numba radix kernel gives torch's stable-argsort ranks exactly, and
della / della_linear merges are bit-identical whichever path ranks them."""

import hashlib

import pytest
import torch

from weightsmith.ops import MergeInputs, fused, get_method, row_ranks
from weightsmith.ops.della import keep_probabilities
from weightsmith.ops.row_ranks import kernel_ranks, torch_ranks

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba not importable")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same_ranks(x: torch.Tensor) -> None:
    got = kernel_ranks(x)
    want = torch_ranks(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert torch.equal(got, want)


# Lengths around the short-row cut-over (SHORT = 32) and the digit-size steps (4 / 8 / 11 bits).
@pytest.mark.parametrize("n", [1, 2, 3, 31, 32, 33, 127, 128, 256, 1023, 1024, 2048])
def test_random_rows_rank_as_torch(n):
    assert_same_ranks(torch.randn(9, n, generator=gen(n)).abs())


@pytest.mark.parametrize("n", [2, 40, 1000])
def test_rows_with_many_ties(n):
    g = gen(n)
    quantised = torch.randint(0, 4, (6, n), generator=g).float() * 0.25  # four values, many zeros
    equal = torch.full((3, n), 0.125)
    zeros = torch.zeros(2, n)
    assert_same_ranks(torch.cat([quantised, equal, zeros]))
    # bf16-valued magnitudes tie often, as in real task vectors
    assert_same_ranks(torch.randn(5, n, generator=g).mul(0.02).abs().bfloat16().float())


def test_signed_zeros_infinities_and_nans_rank_as_torch():
    # Magnitudes are >= 0 (and NaN is refused upstream), but the kernel's order is torch's for
    # every float: -0.0 ties with +0.0, negatives come first, NaNs (any sign) last, tied.
    special = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"), 1.0, -1.0])
    row = special.repeat(6)[torch.randperm(48, generator=gen(1))]
    assert_same_ranks(torch.stack([row, row.flip(0)]))
    short = special[:6].view(1, 6)
    assert_same_ranks(short)
    assert_same_ranks(torch.randn(4, 300, generator=gen(2)).round())  # negatives with ties


@pytest.mark.parametrize("n", [100, 700, 2048])
@pytest.mark.parametrize("digits", [(0,), (1,), (2,), (0, 2), (1, 2), (0, 1, 2)])
def test_rows_whose_keys_differ_in_only_some_radix_digits(digits, n):
    # The kernel skips a pass whose digit is the same in every key: build rows of float32 bit
    # patterns (as int32, positive floats) that differ only in a few bits (9-10, 20-21, 29-30),
    # with ties; bits 0-8 never differ, so the lowest digit's pass is always skipped.
    g = gen(sum(digits))
    bits = torch.full((4, n), 0x3F000000, dtype=torch.int32)
    for d in digits:
        width = 9 if d == 2 else 11  # digit 2 (bits 22..30): stay below the sign bit and NaN
        bits |= torch.randint(0, 4, bits.shape, generator=g, dtype=torch.int32) << (11 * d + width - 2)
    x = bits.view(torch.float32)
    assert torch.isfinite(x).all()
    assert_same_ranks(x)


def test_non_contiguous_inputs():
    x = torch.randn(64, 80, generator=gen(3)).abs()
    assert_same_ranks(x.t())
    assert_same_ranks(x[::3, 1::2])
    assert not x[::3, 1::2].is_contiguous()


@pytest.mark.parametrize("shape", [(4, 50, 3), (2, 7, 5, 2), (3, 1, 4)])
def test_3d_and_4d_tensors_rank_along_dim_1(shape):
    assert_same_ranks(torch.randn(shape, generator=gen(4)).abs())


def test_dispatch_runs_the_kernel_only_on_big_cpu_float32(monkeypatch):
    big = torch.rand(8, row_ranks.MIN_NUMEL // 8)
    assert row_ranks.kernel_applies(big)
    assert not row_ranks.kernel_applies(big.double())
    assert not row_ranks.kernel_applies(big[:1])
    monkeypatch.setenv("WEIGHTSMITH_FUSED", "0")
    assert not row_ranks.kernel_applies(big)
    assert torch.equal(row_ranks.ranks_along_dim1(big), torch_ranks(big))


def test_keep_probabilities_are_bit_identical_on_both_paths(monkeypatch):
    mags = torch.randn(40, 600, generator=gen(5)).mul(0.02).abs().bfloat16().float()
    kernel = keep_probabilities(mags, 0.4, 0.15)
    assert row_ranks.kernel_applies(mags)
    monkeypatch.setattr(row_ranks, "kernel_applies", lambda x: False)
    assert torch.equal(kernel, keep_probabilities(mags, 0.4, 0.15))


def della_bytes(method: str, shape: tuple[int, ...], mode: str) -> torch.Tensor:
    g = gen(5)
    models = torch.randn(3, *shape, generator=g)
    models[1].mul_(1e-3).round_(decimals=2)  # ties
    base = torch.randn(shape, generator=g)
    inputs = MergeInputs("model.layers.0.mlp.w", models, base, generator=gen(11))
    return get_method(method)(
        inputs, weight=[1.0, 0.5, 0.7], density=[0.5, 0.3, 0.6], epsilon=[0.1, 0.2, 0.05],
        normalize=method == "della", rescale=True, rescale_mode=mode,
    )


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(30, 70), (6, 3, 50), (409,)])
@pytest.mark.parametrize("mode", ["inverse_probability", "l1"])
def test_della_merges_are_bit_identical_on_both_paths(monkeypatch, method, shape, mode):
    monkeypatch.setattr(row_ranks, "MIN_NUMEL", 0)  # the kernel for these tiny tensors too
    kernel = della_bytes(method, shape, mode)
    monkeypatch.setattr(row_ranks, "kernel_applies", lambda x: False)
    assert torch.equal(kernel, della_bytes(method, shape, mode))


# sha256 (first 16 hex digits) of the merged bytes, computed with torch's argsort ranks before the
# kernel existed; 300 x 700 is above MIN_NUMEL, so the kernel ranks them now.
GOLDEN = {"della": "2f4b3b51a8f5fd66", "della_linear": "3f3990df4de22fae"}


@pytest.mark.parametrize("method", sorted(GOLDEN))
def test_della_seeded_golden_bytes_unchanged(method):
    out = della_bytes(method, (300, 700), "inverse_probability")
    assert hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest()[:16] == GOLDEN[method]


def test_ranks_do_not_depend_on_the_thread_count():
    x = torch.randn(50, 300, generator=gen(6)).abs()
    previous = fused.set_threads(1)
    try:
        one = kernel_ranks(x)
    finally:
        fused.set_threads(previous)
    assert torch.equal(one, kernel_ranks(x))
    assert torch.equal(one, torch_ranks(x))
