"""DARE: seeded per tensor (bytes depend on the seed only), 1/density or L1 rescale."""

from pathlib import Path

import pytest
import torch
from models import load_folder
from sparse_helpers import merge_to_state, recipe

from weightsmith.errors import RecipeError
from weightsmith.ops import MergeInputs, get_method
from weightsmith.pipeline import merge, plan_merge


def shard_bytes(folder: Path) -> list[bytes]:
    return [f.read_bytes() for f in sorted(folder.glob("*.safetensors"))]


def run_dare(method, models, base, seed=0, **params):
    stacked = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in models])
    g = torch.Generator().manual_seed(seed)
    inputs = MergeInputs("t", stacked, torch.as_tensor(base, dtype=torch.float32), generator=g)
    n = len(models)
    params.setdefault("weight", [1.0] * n)
    params.setdefault("density", [1.0] * n)
    return get_method(method)(inputs, **params), inputs.stats


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_same_seed_same_bytes_other_seed_differs(family, tmp_path, method):
    base, models = family
    rec = recipe(method, base, models, {"density": 0.5})
    a = merge(rec, tmp_path / "a", random_seed=7).out
    # other batching and threads: still the same bytes
    b = merge(rec, tmp_path / "b", random_seed=7, memory_budget="160KB", threads=1).out
    c = merge(rec, tmp_path / "c", random_seed=8).out
    assert shard_bytes(a) == shard_bytes(b)
    sa, sc = load_folder(a), load_folder(c)
    differ = sum(int((sa[k] != sc[k]).sum()) for k in sa if sa[k].dtype.is_floating_point)
    assert differ > 0.3 * sum(v.numel() for v in sa.values())


def test_masks_are_per_model_independent_of_other_densities():
    x = torch.randn(3, 4000)
    base = torch.zeros(4000)
    one, _ = run_dare("dare_linear", [x[0], x[1]], base, density=[0.5, 0.5], weight=[1.0, 0.0])
    other, _ = run_dare("dare_linear", [x[0], x[2]], base, density=[0.5, 0.3], weight=[1.0, 0.0])
    assert torch.equal(one, other)  # model 0's mask ignores model 1's data and density


def test_density_1_is_task_arithmetic(family, tmp_path):
    base, models = family
    ta = merge_to_state(recipe("task_arithmetic", base, models, {"lambda": 0.6},
                               [{"weight": w} for w in (1.0, 0.5, -0.5)]), tmp_path / "ta")
    dl = merge_to_state(recipe("dare_linear", base, models, {"lambda": 0.6},
                               [{"weight": w} for w in (1.0, 0.5, -0.5)]), tmp_path / "dl",
                        random_seed=3)
    for k in ta:
        assert torch.equal(ta[k], dl[k]), k


def test_density_1_dare_ties_is_ties(family, tmp_path):
    base, models = family
    ti = merge_to_state(recipe("ties", base, models, {"normalize": False}), tmp_path / "ti")
    dt = merge_to_state(recipe("dare_ties", base, models), tmp_path / "dt", random_seed=3)
    for k in ti:
        assert torch.equal(ti[k], dt[k]), k


def test_inverse_density_rescale_keeps_values_or_drops_them():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(200_000, generator=g)
    out, stats = run_dare("dare_linear", [tau], torch.zeros_like(tau), density=[0.25])
    kept = out != 0
    assert torch.equal(out[kept], tau[kept] / 0.25)  # survivors scaled by 1/density exactly
    assert abs(kept.float().mean().item() - 0.25) < 0.005  # Bernoulli(0.25), n = 200k
    assert stats["kept[0]"] == kept.sum().item()
    # unbiased: the mean of the rescaled vector tracks the original
    assert abs(out.sum().item() - tau.sum().item()) < 0.05 * tau.abs().sum().item()
    no_rescale, _ = run_dare("dare_linear", [tau], torch.zeros_like(tau), density=[0.25], rescale=False)
    assert torch.equal(no_rescale * 4, out)  # same mask (same seed), no scaling


def test_l1_rescale_matches_the_norm():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(10_000, generator=g)
    base = torch.zeros_like(tau)  # so out - base is the rescaled task vector, exactly
    out, _ = run_dare("dare_linear", [base + tau], base, density=[0.3], rescale_mode="l1")
    delta = out - base
    torch.testing.assert_close(delta.abs().sum(), tau.abs().sum(), rtol=1e-4, atol=0)
    kept = delta != 0
    ratio = delta[kept] / tau[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-6)  # one common factor


def test_dare_ties_hand_computed_structure():
    # Two models with opposite task vectors of different size at density 1: ties election.
    out, stats = run_dare("dare_ties", [[1.0, -3.0], [-2.0, 1.0]], [0.0, 0.0])
    # sums [-1, -2] -> negative elected: c0 keeps -2, c1 keeps -3; normalize false -> sums
    assert out.tolist() == [-2.0, -3.0]
    assert stats["conflict"] == 2
    out, _ = run_dare("dare_ties", [[1.0, -3.0], [-2.0, 1.0]], [0.0, 0.0], normalize=True)
    assert out.tolist() == [-2.0, -3.0]


@pytest.mark.parametrize(
    "params, match",
    [
        ({"density": 0.0}, r"must be in \(0, 1\]"),
        ({"density": -0.1}, r"must be in \(0, 1\]"),
        ({"density": 2}, r"must be in \(0, 1\]"),
        ({"rescale_mode": "l2"}, "inverse_density | l1"),
    ],
)
def test_bad_parameters(family, params, match):
    base, models = family
    for method in ("dare_linear", "dare_ties"):
        with pytest.raises(RecipeError, match=match):
            plan_merge(recipe(method, base, models, params))
