"""DELLA: rank-based keep probabilities per row, 1/p or L1 rescale, seeded per tensor."""

from pathlib import Path

import pytest
import torch
from models import load_folder
from sparse_helpers import merge_to_state, recipe, whole_tensor_budget

from weightsmith.errors import RecipeError
from weightsmith.ops import MergeInputs, get_method
from weightsmith.ops.della import della_drop_, keep_probabilities
from weightsmith.pipeline import merge, plan_merge


def run(method, models, base, seed=0, **params):
    stacked = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in models])
    g = torch.Generator().manual_seed(seed)
    inputs = MergeInputs("t", stacked, torch.as_tensor(base, dtype=torch.float32), generator=g)
    n = len(models)
    params.setdefault("weight", [1.0] * n)
    params.setdefault("density", [1.0] * n)
    params.setdefault("epsilon", [0.15] * n)
    params.setdefault("normalize", method == "della")
    params.setdefault("rescale", True)
    params.setdefault("rescale_mode", "inverse_probability")
    return get_method(method)(inputs, **params), inputs.stats


def reference_drop(x: torch.Tensor, density: float, epsilon: float, u: torch.Tensor) -> torch.Tensor:
    """DELLA's MagPrune written out from the paper: rank |x| in each row (double argsort), map
    ranks linearly onto [density - eps, density + eps], keep where u < p, divide by p."""
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    n = rows.shape[1]
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).float()
    p = (density - epsilon) + ranks / (n - 1) * 2 * epsilon
    return torch.where(u.reshape(rows.shape) < p, rows / p, torch.zeros_like(rows)).reshape(x.shape)


def test_hand_computed_probabilities():
    row = torch.tensor([[1.0, -4.0, 3.0, -2.0]])
    p = keep_probabilities(row.abs(), 0.5, 0.3)
    # ranks by |x|: 1 -> 0, 4 -> 3, 3 -> 2, 2 -> 1; p = 0.2 + r * 0.2
    assert torch.allclose(p, torch.tensor([[0.2, 0.8, 0.6, 0.4]]), atol=1e-7)
    # a one-element row keeps with the density itself
    assert keep_probabilities(torch.ones(5, 1), 0.4, 0.1).eq(0.4).all()


@pytest.mark.parametrize("shape", [(40, 25), (300,), (3, 7, 5)])
def test_drop_matches_the_written_out_reference(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    got = x.clone()
    della_drop_(got, 0.4, 0.2, torch.Generator().manual_seed(9), True, "inverse_probability")
    u = torch.rand(shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(got, reference_drop(x, 0.4, 0.2, u))


def test_keep_rate_follows_rank_and_rescale_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 50, generator=g)
    out = x.clone()
    della_drop_(out, 0.5, 0.3, torch.Generator().manual_seed(3), True, "inverse_probability")
    kept = out != 0
    ranks = x.abs().argsort(dim=1).argsort(dim=1)
    low = kept[ranks == 0].float().mean().item()  # p = 0.2
    high = kept[ranks == 49].float().mean().item()  # p = 0.8
    assert abs(low - 0.2) < 0.03 and abs(high - 0.8) < 0.03
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    # survivors divided by their own probability: E[out] = x
    assert abs(out.sum().item() - x.sum().item()) < 0.02 * x.abs().sum().item()


def test_l1_rescale_keeps_the_l1_norm():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    out = x.clone()
    della_drop_(out, 0.3, 0.1, torch.Generator().manual_seed(1), True, "l1")
    assert (out == 0).float().mean() > 0.5
    assert torch.allclose(out.abs().sum(), x.abs().sum(), rtol=1e-5)
    kept = out != 0
    ratio = out[kept] / x[kept]  # one common factor
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))


@pytest.mark.parametrize(("della", "dare"), [("della_linear", "dare_linear"), ("della", "dare_ties")])
def test_epsilon_0_is_dare_with_the_same_seed(della, dare):
    x = torch.randn(3, 48, 32, generator=torch.Generator().manual_seed(4))
    base = torch.randn(48, 32, generator=torch.Generator().manual_seed(5))
    kw = {"weight": [1.0, 0.5, 0.3], "density": [0.3, 0.5, 0.7], "normalize": False}
    a, _ = run(della, list(x + base), base, seed=11, epsilon=[0.0] * 3, **kw)
    stacked = (x + base).clone()
    b = get_method(dare)(
        MergeInputs("t", stacked, base.clone(), generator=torch.Generator().manual_seed(11)),
        rescale=True, **{"lambda": 1.0}, **kw,
    )
    assert torch.equal(a, b)


def test_one_model_density_1_gives_the_model_and_lambda_0_the_base():
    base = torch.randn(16, 8, generator=torch.Generator().manual_seed(6)).bfloat16().float()
    model = torch.randn(16, 8, generator=torch.Generator().manual_seed(7)).bfloat16().float()
    out, _ = run("della_linear", [model], base)
    assert torch.equal(out, model)  # bf16 inputs: the delta and its sum are exact in float32
    out, _ = run("della", [model], base, density=[0.5], **{"lambda": 0.0})
    assert torch.equal(out, base)


def test_density_1_della_is_ties_and_della_linear_is_task_arithmetic(family, tmp_path):
    base, models = family
    ties = merge_to_state(recipe("ties", base, models), tmp_path / "ties")
    della = merge_to_state(recipe("della", base, models), tmp_path / "della", random_seed=3)
    ta = merge_to_state(recipe("task_arithmetic", base, models, {"lambda": 0.6},
                               [{"weight": w} for w in (1.0, 0.5, -0.5)]), tmp_path / "ta")
    dl = merge_to_state(recipe("della_linear", base, models, {"lambda": 0.6},
                               [{"weight": w} for w in (1.0, 0.5, -0.5)]), tmp_path / "dl", random_seed=3)
    for k in ties:
        assert torch.equal(ties[k], della[k]), k
        assert torch.equal(ta[k], dl[k]), k


def shard_bytes(folder: Path) -> list[bytes]:
    return [f.read_bytes() for f in sorted(folder.glob("*.safetensors"))]


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_seeded_bytes_whatever_the_budget(family, tmp_path, method):
    base, models = family
    rec = recipe(method, base, models, {"density": 0.5, "epsilon": 0.2})
    a = merge(rec, tmp_path / "a", random_seed=7).out
    # a budget far below one tensor: whole tensors in one-off buffers, same bytes
    plan = plan_merge(rec, memory_budget="4KB", random_seed=7)
    assert plan.oversize
    budget = whole_tensor_budget(rec, random_seed=7)
    b = merge(rec, tmp_path / "b", random_seed=7, memory_budget=budget, threads=1).out
    c = merge(rec, tmp_path / "c", random_seed=8).out
    assert shard_bytes(a) == shard_bytes(b)
    sa, sc = load_folder(a), load_folder(c)
    differ = sum(int((sa[k] != sc[k]).sum()) for k in sa if sa[k].dtype.is_floating_point)
    assert differ > 0.3 * sum(v.numel() for v in sa.values())


def test_epsilon_out_of_range_is_a_recipe_error(family):
    base, models = family
    rec = recipe("della", base, models, {"density": 0.1, "epsilon": 0.15})
    with pytest.raises(RecipeError, match="density - epsilon > 0"):
        plan_merge(rec)
    rec = recipe("della", base, models, {"density": 0.9, "epsilon": 0.1})
    with pytest.raises(RecipeError, match="density \\+ epsilon < 1"):
        plan_merge(rec)
    plan_merge(recipe("della", base, models, {"epsilon": 0.5}))  # density 1: nothing dropped


def test_rescale_mode_is_checked(family):
    base, models = family
    with pytest.raises(RecipeError, match="rescale_mode"):
        plan_merge(recipe("della_linear", base, models, {"density": 0.5, "rescale_mode": "l3"}))
