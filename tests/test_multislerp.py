"""Multi-SLERP: weighted spherical barycentre (mergekit's tangent-space formulation)."""

import pytest
import torch
from sparse_helpers import merge_to_state, whole_tensor_budget

from weightsmith.errors import MergeError
from weightsmith.ops import MergeInputs, get_method
from weightsmith.pipeline import plan_merge


def run(models, base=None, **params):
    stacked = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in models])
    b = None if base is None else torch.as_tensor(base, dtype=torch.float32)
    params.setdefault("normalize_weights", True)
    params.setdefault("eps", 1e-8)
    return get_method("multislerp")(MergeInputs("t", stacked, b), **params)


def reference_multislerp(models, weights, base=None, normalize=True, eps=1e-8):
    """The tangent-space algorithm step by step, in float64: unit vectors, weighted Euclidean
    mean direction, log map (tangent projection), weighted tangent mean, exp map, mean norm."""
    x = torch.stack([m.double() for m in models])
    if base is not None:
        x = x - base.double()
    flat = x.reshape(len(x), -1)
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = flat.norm(dim=1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangents = units - (units @ mean)[:, None] * mean
    tau = (tangents * w[:, None]).sum(0)
    tn = tau.norm() + eps
    result = mean * torch.cos(tn) + tau * torch.sin(tn) / tn
    result = (result * (norms.squeeze(1) * w).sum()).reshape(x.shape[1:])
    return result + (base.double() if base is not None else 0)


def test_hand_computed_two_orthogonal():
    # unit x and 3*unit y, equal weights: direction (1, 1)/sqrt 2, norm (1 + 3) / 2 = 2
    out = run([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])], weight=[1.0, 1.0])
    assert torch.allclose(out, torch.tensor([2**0.5, 2**0.5]))


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_the_tangent_space_reference(with_base, normalize):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 6, generator=g)
    models = [base + 0.5 * torch.randn(10, 6, generator=g) for _ in range(4)]
    w = [0.4, 0.3, 0.2, 0.6]
    b = base if with_base else None
    got = run(models, b, weight=w, normalize_weights=normalize)
    want = reference_multislerp(models, w, b, normalize)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_one_model_is_returned_and_identical_models_give_themselves():
    m = torch.randn(5, 3)
    assert torch.equal(run([m], weight=[0.3]), m)
    out = run([m, m, m], weight=[1.0, 2.0, 3.0])
    torch.testing.assert_close(out, m)


def test_antipodal_pair_falls_back_to_lerp_more_raise():
    a = torch.tensor([1.0, 2.0])
    out = run([a, -a], weight=[1.0, 1.0])
    assert torch.equal(out, torch.zeros(2))  # 0.5 a + 0.5 (-a)
    with pytest.raises(MergeError, match="antipodal"):
        run([a, -a, a, -a], weight=[1.0, 1.0, 1.0, 1.0])
    with pytest.raises(MergeError, match="sum to 0"):
        run([a, a], weight=[1.0, -1.0])


def test_whole_tensors_under_a_tiny_budget(family, tmp_path):
    base, models = family
    entries = [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, (0.5, 0.3, 0.2))]
    rec = {"merge_method": "multislerp", "base_model": str(base), "models": entries}
    assert plan_merge(rec, memory_budget="4KB").oversize  # norms over whole tensors
    small = merge_to_state(rec, tmp_path / "small", memory_budget=whole_tensor_budget(rec))
    big = merge_to_state(rec, tmp_path / "big")
    for k in big:
        assert torch.equal(small[k], big[k]), k
