"""NearSwap: swap in the model's value where it is within t of the base's."""

import pytest
import torch

from weightsmith.errors import RecipeError
from weightsmith.ops import MergeInputs, get_method
from weightsmith.pipeline import plan_merge


def run(model, base, t):
    inputs = MergeInputs("t", torch.as_tensor(model, dtype=torch.float32).unsqueeze(0).clone(),
                         torch.as_tensor(base, dtype=torch.float32).clone())
    return get_method("nearswap")(inputs, t=t)


def test_hand_computed():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    model = torch.tensor([0.05, 0.2, -1.0, 1.0])
    # |diff| 0.05 <= t: swap; 0.2: w = 0.5; 1.0: w = 0.1; 0 (floored at 1e-6): w = 1
    out = run(model, base, 0.1)
    assert torch.allclose(out, torch.tensor([0.05, 0.1, -0.1, 1.0]))


def test_t_0_gives_the_base_and_large_t_the_model():
    g = torch.Generator().manual_seed(0)
    base, model = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert torch.equal(run(model, base, 0.0), base)
    assert torch.equal(run(model, base, 1e9), model)


def test_matches_the_written_out_definition():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 30, generator=g)
    model = base + 0.02 * torch.randn(40, 30, generator=g)
    w = (0.01 / (base - model).abs().clamp(min=1e-6)).clamp(0, 1)
    assert torch.equal(run(model, base, 0.01), w * model + (1 - w) * base)


def test_needs_a_base_and_one_model(family):
    base, models = family
    rec = {"merge_method": "nearswap", "base_model": str(base), "parameters": {"t": 0.01},
           "models": [{"model": str(m)} for m in models]}
    with pytest.raises(RecipeError, match="exactly 1"):
        plan_merge(rec)
    del rec["base_model"]
    rec["models"] = rec["models"][:1]
    with pytest.raises(RecipeError, match="needs a base_model"):
        plan_merge(rec)
