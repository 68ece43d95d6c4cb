"""Identity, hand-computed and reference-semantics tests for linear, task_arithmetic, wise_ft."""

import pytest
import torch

from weightsmith.errors import MergeError
from weightsmith.ops import MergeInputs, get_method


def run(method, models, base=None, **params):
    stacked = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in models])
    b = torch.as_tensor(base, dtype=torch.float32) if base is not None else None
    return get_method(method)(MergeInputs("t", stacked, b), **params)


def test_linear_hand_computed():
    out = run("linear", [[1.0, 2.0], [3.0, 6.0]], weight=[1.0, 3.0])
    assert out.tolist() == [2.5, 5.0]  # (1*1 + 3*3)/4, (2 + 18)/4
    out = run("linear", [[1.0, 2.0], [3.0, 6.0]], weight=[1.0, 3.0], normalize=False)
    assert out.tolist() == [10.0, 20.0]


def test_linear_identity_is_bit_exact():
    x = torch.randn(1000)
    assert torch.equal(run("linear", [x], weight=[1.0]), x)
    # a uniform soup of identical models is that model
    assert torch.equal(run("linear", [x, x, x, x], weight=[1.0] * 4), x)


def test_linear_zero_weight_sum_is_a_clear_error():
    with pytest.raises(MergeError, match="sum to 0"):
        run("linear", [[1.0], [2.0]], weight=[1.0, -1.0])


def test_task_arithmetic_hand_computed_and_negation():
    base = [1.0, 1.0]
    out = run("task_arithmetic", [[2.0, 0.0], [1.5, 3.0]], base, weight=[1.0, -2.0], **{"lambda": 0.5})
    # tau = [1, -1], [0.5, 2]; sum w*tau = [1 - 1, -1 - 4] = [0, -5]; base + 0.5 * that
    assert out.tolist() == [1.0, -1.5]
    out = run("task_arithmetic", [[2.0, 0.0], [1.5, 3.0]], base, weight=[1.0, 3.0], normalize=True)
    assert out.tolist() == pytest.approx([1.0 + (1 + 1.5) / 4, 1.0 + (-1 + 6) / 4])


def test_task_arithmetic_identities():
    base, ft = torch.randn(500), torch.randn(500)
    # lambda 0 gives the base bit for bit
    assert torch.equal(run("task_arithmetic", [ft], base, weight=[1.0], **{"lambda": 0.0}), base)
    # one model at weight 1 gives that model back (bf16 inputs: exact after casting back)
    b16, f16 = base.bfloat16().float(), ft.bfloat16().float()
    out = run("task_arithmetic", [f16], b16, weight=[1.0]).bfloat16()
    assert torch.equal(out, ft.bfloat16())


def test_task_arithmetic_analogy_matches_reference_semantics():
    # "A is to B as C is to D": tau_D = tau_C + (tau_B - tau_A)
    g = torch.Generator().manual_seed(0)
    base, a, b, c = (torch.randn(64, generator=g) for _ in range(4))
    out = run("task_arithmetic", [a, b, c], base, weight=[-1.0, 1.0, 1.0], **{"lambda": 0.7})
    expected = base + 0.7 * ((c - base) + ((b - base) - (a - base)))
    assert torch.allclose(out, expected, atol=1e-6)


def test_wise_ft_endpoints_and_midpoint():
    base, ft = torch.randn(100), torch.randn(100)
    assert torch.equal(run("wise_ft", [ft], base, alpha=0.0), base)
    assert torch.equal(run("wise_ft", [ft], base, alpha=1.0), ft)
    assert torch.allclose(run("wise_ft", [ft], base, alpha=0.25), 0.75 * base + 0.25 * ft)


def test_registry_lists_methods_and_rejects_unknown():
    from weightsmith.ops import methods

    assert {"linear", "task_arithmetic", "wise_ft"} <= set(methods())
    with pytest.raises(KeyError, match="known methods"):
        get_method("nope")


def test_sequential_adds_equal_dim0_sum_bitwise():
    # task_arithmetic relies on this to match mergekit's `.sum(0)` bit for bit, faster.
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 5):
        x = torch.randn(n, 4096, generator=g) * torch.logspace(-8, 8, 4096)
        acc = x[0].clone()
        for i in range(1, n):
            acc.add_(x[i])
        assert torch.equal(acc, x.sum(0))


def test_all_finite_catches_nan_and_inf_in_every_float_dtype():
    from weightsmith.engine.executor import all_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = torch.randn(10000).to(dtype)
        assert all_finite(x)
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y[7777] = bad
            assert not all_finite(y)
    assert all_finite(torch.empty(0))


@pytest.mark.parametrize("shape", [(3, 300, 70), (2, 5000), (4, 3, 5, 7), (1, 0), (2, 1)])
def test_task_vector_norms_equal_the_per_model_norms(shape):
    # merge_report.json's sq_tv[i]: model i's float32 norm squared in double, per model (a
    # stacked reduction along dim 1 gives the same bits but parallelizes over N outputs only),
    # within float32 rounding of the exact sum of squares.
    from weightsmith.ops.task_arithmetic import record_task_vector_norms, squared_norm

    tau = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    stats: dict[str, float] = {}
    record_task_vector_norms(stats, tau)
    assert stats["numel"] == tau[0].numel()
    assert sorted(stats) == sorted(["numel"] + [f"sq_tv[{i}]" for i in range(shape[0])])
    for i in range(shape[0]):
        assert stats[f"sq_tv[{i}]"] == pytest.approx(squared_norm(tau[i]), rel=1e-6, abs=0.0)
        exact = float(tau[i].double().pow(2).sum())
        assert stats[f"sq_tv[{i}]"] == pytest.approx(exact, rel=1e-5, abs=0.0)
