"""NuSLERP: SLERP of two models or of their task vectors, flat, per row or per column."""

import math

import pytest
import torch
from sparse_helpers import merge_to_state, whole_tensor_budget

from weightsmith.errors import RecipeError
from weightsmith.ops import MergeInputs, get_method
from weightsmith.pipeline import plan_merge


def run(models, base=None, **params):
    stacked = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in models])
    b = None if base is None else torch.as_tensor(base, dtype=torch.float32)
    params.setdefault("nuslerp_flatten", True)
    params.setdefault("nuslerp_row_wise", False)
    return get_method("nuslerp")(MergeInputs("t", stacked, b), **params)


def reference_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Textbook SLERP of two vectors (float64), lerp when they are colinear."""
    a, b = v0.double(), v1.double()
    cos = (a @ b / (a.norm().clamp(min=1e-7) * b.norm().clamp(min=1e-7))).clamp(-1, 1)
    theta = torch.acos(cos)
    if (1 - cos**2) <= 1e-16:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def reference_nuslerp(m0, m1, base, w, flatten, row_wise):
    t = w[1] / (w[0] + w[1])
    v0, v1 = (m0 - base, m1 - base) if base is not None else (m0, m1)
    if flatten or v0.dim() < 2:
        out = reference_slerp(v0.reshape(-1), v1.reshape(-1), t).reshape(v0.shape)
    elif row_wise:  # columns
        out = torch.stack([reference_slerp(v0[:, j], v1[:, j], t) for j in range(v0.shape[1])], 1)
    else:
        out = torch.stack([reference_slerp(v0[i], v1[i], t) for i in range(v0.shape[0])])
    return out + (base.double() if base is not None else 0)


def test_hand_computed_quarter_circle():
    # orthogonal unit vectors, t = 1/3: (sin(pi/3), sin(pi/6)) on the unit circle
    out = run([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], weight=[2.0, 1.0])
    assert torch.allclose(out, torch.tensor([math.sin(math.pi / 3), math.sin(math.pi / 6)]))


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("row_wise", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
def test_matches_the_written_out_reference(flatten, row_wise, with_base):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 7, generator=g)
    m0, m1 = base + 0.3 * torch.randn(12, 7, generator=g), base + 0.3 * torch.randn(12, 7, generator=g)
    m1[3] = 2 * m0[3] if not with_base else m1[3]  # one colinear row
    b = base if with_base else None
    got = run([m0, m1], b, weight=[0.7, 0.5], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    want = reference_nuslerp(m0, m1, b, [0.7, 0.5], flatten, row_wise)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flatten", [True, False])
def test_weight_0_gives_a_model_back(flatten):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 5, generator=g).bfloat16().float()
    m0, m1 = (torch.randn(6, 5, generator=g).bfloat16().float() for _ in range(2))
    assert torch.equal(run([m0, m1], weight=[1.0, 0.0], nuslerp_flatten=flatten), m0)
    assert torch.equal(run([m0, m1], weight=[0.0, 1.0], nuslerp_flatten=flatten), m1)
    # with a base the task vectors are slerped: t = 0 is the first model (exact for bf16 inputs)
    assert torch.equal(run([m0, m1], base, weight=[1.0, 0.0], nuslerp_flatten=flatten), m0)


def test_zero_weight_sum_is_the_midpoint():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = run([a, b], weight=[1.0, -1.0])
    assert torch.allclose(out, torch.tensor([math.sin(math.pi / 4)] * 2))


def test_needs_exactly_two_models(family, tmp_path):
    base, models = family
    rec = {"merge_method": "nuslerp", "base_model": str(base),
           "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}
    with pytest.raises(RecipeError, match="exactly 2"):
        plan_merge(rec)
    rec["models"] = rec["models"][:2]
    rec["parameters"] = {"nuslerp_flatten": False}
    plan = plan_merge(rec, memory_budget="4KB")
    assert plan.oversize  # rows of a tensor are slerped together: whole tensors
    small = merge_to_state(rec, tmp_path / "small", memory_budget=whole_tensor_budget(rec))
    big = merge_to_state(rec, tmp_path / "big")
    for k in big:
        assert torch.equal(small[k], big[k]), k
