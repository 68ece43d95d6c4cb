"""SCE: variance selection, mean-square weights, sign erase (FuseChat / mergekit's sce)."""

import pytest
import torch
from sparse_helpers import merge_to_state, recipe, whole_tensor_budget

from weightsmith.ops import MergeInputs, get_method
from weightsmith.ops.sce import variance_selection_count
from weightsmith.pipeline import plan_merge


def run(models, base, **params):
    stacked = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in models])
    inputs = MergeInputs("t", stacked, torch.as_tensor(base, dtype=torch.float32))
    return get_method("sce")(inputs, **params)


def reference_sce(models: torch.Tensor, base: torch.Tensor, topk: float) -> torch.Tensor:
    """SCE written out from the paper's three steps in matrix form (exactly-k selection by a
    full sort; the test inputs have no tied variances)."""
    tv = models - base
    if topk < 1:
        var = tv.var(dim=0, unbiased=False).reshape(-1)
        k = variance_selection_count(int((var != 0).sum()), topk)
        mask = torch.zeros_like(var)
        mask[var.argsort(descending=True)[:k]] = 1
        tv = tv * mask.reshape(base.shape)
    w = tv.reshape(len(tv), -1).pow(2).mean(1)
    w = w / w.sum()
    sign = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(tv) == sign).float()
    ew = w.view(-1, *[1] * base.dim()) * agree
    return base + (tv * ew).sum(0) / ew.sum(0).clamp(min=1e-6)


def test_hand_computed():
    base = torch.zeros(4)
    models = torch.tensor([[1.0, 2.0, -1.0, 0.0], [3.0, -2.0, -1.0, 0.0]])
    # weights: mean squares 6/4 and 14/4 -> 0.3, 0.7; elected signs: +, + (0 -> +), -, + (0)
    out = run(models, base, select_topk=1.0)
    # col 0: both agree: (0.3*1 + 0.7*3)/1 = 2.4; col 1: only model 0: 2; col 2: both: -1; col 3: 0
    assert torch.allclose(out, torch.tensor([2.4, 2.0, -1.0, 0.0]))
    # select_topk 0.5: variances [1, 4, 0, 0] -> 2 non-zero, k = 1: only column 1 survives;
    # weights from the selected vectors: 1/4 each -> 0.5, 0.5; elected sign of 0 -> +
    out = run(models, base, select_topk=0.5)
    assert torch.allclose(out, torch.tensor([0.0, 2.0, 0.0, 0.0]))


def test_float32_count_as_mergekit():
    assert int(90 * 0.7) == 62  # 62.99999999999999 in float64
    assert variance_selection_count(90, 0.7) == 63  # the float32 product rounds to 63
    assert variance_selection_count(1000, 0.3) == 300


@pytest.mark.parametrize("topk", [1.0, 0.3, 0.05])
def test_matches_the_written_out_reference(topk):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(24, 16, generator=g)
    models = base + 0.1 * torch.randn(3, 24, 16, generator=g)
    got = run(models.clone(), base.clone(), select_topk=topk)
    want = reference_sce(models, base, topk)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_one_model_gives_it_back():
    base = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    model = torch.randn(16, 8, generator=torch.Generator().manual_seed(2)).bfloat16().float()
    assert torch.equal(run([model], base), model)


def test_select_0_gives_the_base():
    base = torch.randn(10)
    assert torch.equal(run([base + 1, base - 2], base, select_topk=0.0), base)


def test_whole_tensors_under_a_tiny_budget(family, tmp_path):
    base, models = family
    rec = recipe("sce", base, models, {"select_topk": 0.5})
    plan = plan_merge(rec, memory_budget="4KB")
    assert plan.oversize  # the per-tensor variance selection needs whole tensors
    small = merge_to_state(rec, tmp_path / "small", memory_budget=whole_tensor_budget(rec))
    big = merge_to_state(rec, tmp_path / "big")
    assert small.keys() == big.keys()
    for k in big:
        assert torch.equal(small[k], big[k]), k
