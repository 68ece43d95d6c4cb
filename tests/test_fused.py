"""The fused CPU kernels (ops/fused.py) give the torch path's outputs bit for bit."""

import math

import pytest
import torch

from weightsmith.errors import NonFiniteInput
from weightsmith.ops import MergeInputs, fused, get_method
from weightsmith.ops.ties import TiesModelContext, TiesModelStatistics

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba not importable")

N = 3 * fused.BLOCK + 4321  # several blocks and a ragged last one


def family(n: int = N, models: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).bfloat16().float()
    base[:50] = 0.0  # +0 and -0 in the base: the sign of a zero sum must match too
    base[50:100] = -0.0
    stacked = (base + 0.01 * torch.randn(models, n, generator=g)).bfloat16().float()
    stacked[0, 200:2000] = base[200:2000]  # zero task-vector entries
    stacked[1, :100] = base[:100]
    return stacked, base


def run(monkeypatch, method: str, use_fused: bool, stacked, base, seed: int = 7, **params):
    monkeypatch.setenv("WEIGHTSMITH_FUSED", "1" if use_fused else "0")
    inputs = MergeInputs("t", stacked.clone(), base.clone(), generator=torch.Generator().manual_seed(seed))
    out = get_method(method)(inputs, **params).clone()
    return out, inputs.stats


CASES = [
    ("ties", dict(weight=[0.3, 0.5, 0.2], density=[0.2, 0.5, 1.0])),
    ("ties", {"weight": [1.0, 1.0, 1.0], "density": [0.1, 0.2, 0.3], "lambda": 0.7}),
    ("ties", dict(weight=[0.3, -0.5, 1.2], density=[0.1, 0.2, 0.3], normalize=False)),
    ("ties", {"weight": [0.0, 0.5, 0.5], "density": [0.2, 0.2, 0.2], "lambda": -1.5}),
    ("breadcrumbs", dict(weight=[0.3, 0.5, 0.2], density=[0.2, 0.5, 0.9], gamma=[0.01, 0.05, 0.2])),
    ("breadcrumbs_ties", dict(weight=[0.3, 0.5, 0.2], density=[0.2, 0.001, 1.0], gamma=[0.0, 0.3, 0.0])),
    ("breadcrumbs", dict(weight=[1.0, 1.0, 1.0], density=[0.00001, 0.5, 0.5], gamma=[0.01, 0.6, 0.5])),
    ("dare_ties", dict(weight=[0.3, 0.5, 0.2], density=[0.2, 0.5, 0.9])),
    ("dare_linear", {"weight": [0.3, 0.5, 0.2], "density": [0.3, 0.3, 1.0], "lambda": 2.0}),
]


@pytest.mark.parametrize("method,params", CASES)
def test_fused_equals_torch_bit_for_bit(monkeypatch, method, params):
    stacked, base = family()
    ref, ref_stats = run(monkeypatch, method, False, stacked, base, **params)
    out, stats = run(monkeypatch, method, True, stacked, base, **params)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
    assert set(stats) == set(ref_stats)
    for key, value in ref_stats.items():
        # Counts are exact. Sums of squares: the torch path adds float32 norms per chunk (~1e-5
        # relative here), the kernels accumulate in float64 (closer to exact), so 1e-4.
        assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key


def test_fused_ties_hand_checked_threshold(monkeypatch):
    # One model, density 0.25 of 4 * 8192 entries: exactly the top quarter of |delta| survives.
    n = 4 * 8192
    base = torch.zeros(n)
    delta = torch.arange(1, n + 1, dtype=torch.float32) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    out, stats = run(monkeypatch, "ties", True, delta.unsqueeze(0), base, weight=[1.0], density=[0.25])
    keep = delta.abs() > 0.75 * n
    assert torch.equal(out, delta * keep)
    assert stats["kept[0]"] == n / 4


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    stacked, base = family()
    params = dict(weight=[0.3, 0.5, 0.2], density=[0.2, 0.5, 0.7])
    previous = fused.set_threads(1)
    try:
        one, one_stats = run(monkeypatch, "ties", True, stacked, base, **params)
        fused.set_threads(2)
        two, two_stats = run(monkeypatch, "ties", True, stacked, base, **params)
    finally:
        fused.set_threads(previous)
    assert torch.equal(one.view(torch.int32), two.view(torch.int32))
    assert one_stats == two_stats


@pytest.mark.parametrize("use_fused", [True, False])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_in_an_input_is_an_error_not_trimmed_away(monkeypatch, use_fused, bad):
    # Sign election would drop the NaN here (NaN agrees with no sign): it must not pass silently.
    stacked, base = family()
    stacked[1, 12345] = bad
    with pytest.raises(NonFiniteInput, match="NaN/Inf"):
        run(monkeypatch, "ties", use_fused, stacked, base, weight=[1.0] * 3, density=[0.2] * 3)


def test_small_tensors_and_float64_take_the_torch_path():
    stacked, base = family(n=100)
    assert not fused.usable(stacked)
    stacked, base = family()
    assert fused.usable(stacked) and not fused.usable(stacked.double())


@pytest.mark.parametrize("aggregation", ["dis-mean", "dis-sum", "dis-max"])
@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_model_scope_output_pass_equals_torch(monkeypatch, aggregation, lam):
    stacked, base = family()
    ctx = TiesModelContext(thresholds=(0.004, None, 0.01), majority_sign=-1, parameters=N)
    params = {"weight": [1.0, 0.5, 2.0], "density": [0.2, 1.0, 0.1], "scope": "model",
              "aggregation": aggregation, "lambda": lam}

    def go(use_fused):
        monkeypatch.setenv("WEIGHTSMITH_FUSED", "1" if use_fused else "0")
        inputs = MergeInputs("t", stacked.clone(), base.clone(), context=ctx)
        return get_method("ties")(inputs, **params).clone(), inputs.stats

    ref, ref_stats = go(False)
    out, stats = go(True)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
    assert set(stats) == set(ref_stats)
    for key, value in ref_stats.items():
        assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key


def test_model_scope_statistics_equal_torch(monkeypatch):
    stacked, base = family()
    weight = [1.0, 0.5, 2.0]

    def passes(use_fused):
        monkeypatch.setenv("WEIGHTSMITH_FUSED", "1" if use_fused else "0")
        st = TiesModelStatistics([0.2, 1.0, 0.05], torch.float32)
        while st.wants_pass():
            total = None
            for block in (slice(0, 40000), slice(40000, N)):  # two row blocks, as the engine may
                inputs = MergeInputs("t", stacked[:, block].clone(), base[block].clone())
                part = st.collect(inputs, weight=weight)
                total = part if total is None else st.combine(total, part)
            st.absorb(total)
        return st.result()

    ref, got = passes(False), passes(True)
    assert got == ref and ref.thresholds[1] is None and ref.majority_sign in (-1, 0, 1)



def test_threads_option_sets_the_kernel_pool_for_the_merge_only(family_dirs):
    import numba

    from weightsmith.pipeline import merge

    base, models = family_dirs
    seen = []
    original = fused.combine_into

    def spy(*args, **kwargs):
        seen.append(numba.get_num_threads())
        return original(*args, **kwargs)

    before = numba.get_num_threads()
    fused.combine_into = spy
    try:
        params = {"weight": 1.0, "density": 0.3}
        recipe = {"merge_method": "ties", "base_model": str(base),
                  "models": [{"model": str(m), "parameters": params} for m in models]}
        merge(recipe, models[0].parent / "out", threads=1)
    finally:
        fused.combine_into = original
    assert seen and set(seen) == {1}
    assert numba.get_num_threads() == before


@pytest.fixture
def family_dirs(tmp_path):
    from models import save_model

    stacked, base = family(n=200 * 256)
    shape = (200, 256)
    base_dir = save_model(tmp_path / "base", {"w": base.reshape(shape).bfloat16()}, {}, shards=1)
    dirs = [save_model(tmp_path / f"m{i}", {"w": stacked[i].reshape(shape).bfloat16()}, {}, shards=1)
            for i in range(3)]
    return base_dir, dirs
