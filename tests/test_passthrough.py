"""Passthrough: one input copied, optionally scaled by filter."""

import pytest
import torch
from models import load_folder
from sparse_helpers import merge_to_state

from weightsmith.errors import RecipeError
from weightsmith.pipeline import plan_merge


def test_copies_bit_for_bit_and_scales_by_filter(family, tmp_path):
    _, models = family
    src = load_folder(models[0])
    out = merge_to_state({"merge_method": "passthrough", "models": [{"model": str(models[0])}]},
                         tmp_path / "copy")
    assert out.keys() == src.keys()
    for k in src:
        assert torch.equal(out[k], src[k]), k
    scaled = merge_to_state({
        "merge_method": "passthrough",
        "models": [{"model": str(models[0]),
                    "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 0.5}]}}],
    }, tmp_path / "scaled")
    for k in src:
        if "o_proj" in k:
            assert not scaled[k].any(), k
        else:
            assert torch.equal(scaled[k], (src[k].float() * 0.5).to(src[k].dtype)), k


def test_exactly_one_input(family):
    base, models = family
    with pytest.raises(RecipeError, match="exactly 1"):
        plan_merge({"merge_method": "passthrough", "models": [{"model": str(m)} for m in models[:2]]})
    # a base_model is one more input, as in mergekit
    with pytest.raises(RecipeError, match="exactly 1"):
        plan_merge({"merge_method": "passthrough", "base_model": str(base),
                    "models": [{"model": str(models[0])}]})
