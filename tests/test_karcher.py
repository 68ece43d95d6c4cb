"""Karcher mean on the unit sphere (mergekit's iteration, run on Gram-matrix coefficients)."""

import math

import pytest
import torch
from sparse_helpers import merge_to_state, whole_tensor_budget

from weightsmith.ops import MergeInputs, get_method
from weightsmith.pipeline import plan_merge


def run(models, **params):
    stacked = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in models])
    params.setdefault("max_iter", 10)
    params.setdefault("tol", 1e-5)
    inputs = MergeInputs("t", stacked)
    return get_method("karcher")(inputs, **params), inputs.stats


def reference_karcher(models, max_iter=10, tol=1e-5):
    """The fixed-point iteration on full float64 vectors, step by step."""
    xs = [m.double().reshape(-1) for m in models]
    norms = [float(x.norm()) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    units = [xs[i] / norms[i] for i in valid]
    a = [1.0 / len(valid)] * len(valid)
    m = sum(ai * u for ai, u in zip(a, units))
    m = m / m.norm()
    for _ in range(max_iter):
        t = torch.zeros_like(m)
        for ai, u in zip(a, units):
            d = torch.clamp(m @ u, -1, 1)
            th = torch.arccos(d)
            if th < tol:
                continue
            t += ai * th / torch.sin(th) * (u - d * m)
        tn = t.norm()
        if tn < tol:
            break
        m = torch.cos(tn) * m + torch.sin(tn) * t / tn
        m = m / m.norm()
    return (sum(norms) / len(models) * m).reshape(models[0].shape)


def test_two_orthogonal_vectors_meet_halfway():
    out, _ = run([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])])
    # geodesic midpoint (1, 1)/sqrt 2, scaled by the mean norm 3
    assert torch.allclose(out, torch.tensor([3 / math.sqrt(2)] * 2))


def test_three_points_converge_to_the_spherical_mean():
    # e1, e2, e3: by symmetry the mean direction is (1, 1, 1)/sqrt 3
    out, stats = run(list(torch.eye(3)))
    assert torch.allclose(out, torch.full((3,), 1 / math.sqrt(3)), atol=1e-6)
    assert stats["iterations"] >= 1


@pytest.mark.parametrize("max_iter", [1, 3, 10])
def test_matches_the_full_vector_iteration(max_iter):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(20, 9, generator=g)
    models = [base + 0.6 * torch.randn(20, 9, generator=g) for _ in range(4)]
    got, _ = run(models, max_iter=max_iter)
    torch.testing.assert_close(got.double(), reference_karcher(models, max_iter), rtol=1e-5, atol=1e-6)


def test_one_model_is_returned_zero_inputs_give_zero():
    m = torch.randn(4, 4)
    assert torch.equal(run([m])[0], m)
    assert torch.equal(run([torch.zeros(3), torch.zeros(3)])[0], torch.zeros(3))
    # a zero input adds no direction but counts in the mean norm
    out, _ = run([torch.tensor([2.0, 0.0]), torch.zeros(2)])
    assert torch.allclose(out, torch.tensor([1.0, 0.0]))


def test_identical_models_give_themselves():
    m = torch.randn(6, 5)
    out, _ = run([m, m, m])
    torch.testing.assert_close(out, m)


def test_base_is_one_more_input_and_whole_tensors(family, tmp_path):
    base, models = family
    rec = {"merge_method": "karcher", "base_model": str(base),
           "models": [{"model": str(m)} for m in models[:2]]}
    plan = plan_merge(rec, memory_budget="4KB")
    assert len(plan.model_indices) == 3  # the base joins the mean, as in mergekit
    assert plan.oversize
    small = merge_to_state(rec, tmp_path / "small", memory_budget=whole_tensor_budget(rec))
    big = merge_to_state(rec, tmp_path / "big")
    for k in big:
        assert torch.equal(small[k], big[k]), k
