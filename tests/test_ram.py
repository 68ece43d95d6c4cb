"""RAM and RAM+ (tensor-local): shared entries averaged, unique ones kept (and boosted)."""

import pytest
import torch
from sparse_helpers import merge_to_state, recipe, whole_tensor_budget

from weightsmith.ops import MergeInputs, get_method
from weightsmith.pipeline import plan_merge


def run(method, models, base, **params):
    stacked = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in models])
    inputs = MergeInputs("t", stacked, torch.as_tensor(base, dtype=torch.float32).clone())
    params.setdefault("epsilon", 1e-5)
    if method == "ramplus_tl":
        params.setdefault("r", 0.1)
        params.setdefault("alpha", 0.2)
    return get_method(method)(inputs, **params)


def reference(models, base, eps=1e-5, plus=False, r=0.1, alpha=0.2):
    """RAM written out with explicit masks (float64)."""
    tv = torch.stack([m.double() - base.double() for m in models])
    active = tv.abs() > eps
    c = active.sum(0)
    unique, shared = c == 1, c > 1
    lam = torch.ones(len(tv), dtype=torch.float64)
    if plus:
        for i in range(len(tv)):
            s, u = (active[i] & shared).sum().item(), (active[i] & unique).sum().item()
            lam[i] = 1 + r * min(max(s / max(u, eps), 0), alpha)
    out = torch.zeros_like(base, dtype=torch.float64)
    for i in range(len(tv)):
        out += torch.where(active[i] & unique, tv[i] * lam[i], 0.0)
        out += torch.where(active[i] & shared, tv[i] / c.clamp(min=1), 0.0)
    return base.double() + out


def test_hand_computed():
    base = torch.zeros(4)
    models = [torch.tensor([1.0, 2.0, 1e-6, 0.0]), torch.tensor([3.0, 0.0, 0.0, -4.0])]
    # col 0 shared: (1 + 3)/2; col 1 unique to model 0; col 2 below epsilon: dropped; col 3 unique
    assert torch.allclose(run("ram", models, base), torch.tensor([2.0, 2.0, 0.0, -4.0]))
    # RAM+: model 0 has 1 shared, 1 unique -> rho 1 -> clamp 0.2 -> lambda 1.02; model 1 the same
    assert torch.allclose(run("ramplus_tl", models, base), torch.tensor([2.0, 2.04, 0.0, -4.08]))


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_matches_the_written_out_reference(method):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(30, 20, generator=g)
    models = []
    for _ in range(3):
        d = 0.01 * torch.randn(30, 20, generator=g)
        d[torch.rand(30, 20, generator=g) < 0.6] = 0  # sparse edits that overlap in part
        models.append(base + d)
    got = run(method, models, base)
    want = reference(models, base, plus=method == "ramplus_tl")
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_one_model_gives_it_back(method):
    base = torch.randn(8, 8).bfloat16().float()
    model = torch.randn(8, 8).bfloat16().float()
    # every entry is that model's alone: ram adds it whole; RAM+ has no shared entries (rho 0)
    assert torch.equal(run(method, [model], base), model)


def test_ramplus_takes_whole_tensors_ram_row_blocks(family, tmp_path):
    base, models = family
    rec = recipe("ramplus_tl", base, models, {"alpha": 0.5})
    assert plan_merge(rec, memory_budget="4KB").oversize
    small = merge_to_state(rec, tmp_path / "small", memory_budget=whole_tensor_budget(rec))
    big = merge_to_state(rec, tmp_path / "big")
    for k in big:
        assert torch.equal(small[k], big[k]), k
    rec = recipe("ram", base, models)
    assert not plan_merge(rec, memory_budget="4KB").oversize  # elementwise: split into blocks
