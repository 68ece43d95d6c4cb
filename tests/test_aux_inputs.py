"""Checkpoint-valued parameters: the engine reads extra checkpoints for a method."""

import pytest
import torch
from models import LLAMA_CONFIG, load_folder, perturb, random_state, save_model

import weightsmith
from weightsmith.errors import MergeError, RecipeError
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register


def _rebase(inputs: MergeInputs, weight: list[float], source: str, mask: str | None = None) -> torch.Tensor:
    out = inputs.base.clone()
    for i, w in enumerate(weight):
        src = inputs.aux["source"][i]
        if src is None:
            raise MergeError(f"{inputs.name}: no source tensor")
        delta = inputs.models[i] - src
        if inputs.aux.get("mask") is not None:
            delta = delta * inputs.aux["mask"]
        out += w * delta
    return out


register(
    MergeMethod(
        name="test_rebase",
        fn=_rebase,
        params=(
            Param("weight", 1.0, per_model=True),
            Param("source", per_model=True, kind=str, checkpoint=True),
            Param("mask", None, kind=str, checkpoint=True),
        ),
        base="required",
        summary="test-only: base + sum w (model - source)",
        compute_dtype=torch.float64,
    )
)


def test_per_model_and_shared_checkpoint_parameters(tmp_path):
    old = random_state(LLAMA_CONFIG, 1)
    new = random_state(LLAMA_CONFIG, 2)
    ft = perturb(old, 3)
    old_dir = save_model(tmp_path / "old", old, LLAMA_CONFIG, shards=2)
    new_dir = save_model(tmp_path / "new", new, LLAMA_CONFIG, shards=2)
    ft_dir = save_model(tmp_path / "ft", ft, LLAMA_CONFIG, shards=2)
    mask = {k: (torch.arange(v.numel()) % 2).reshape(v.shape).float() for k, v in old.items()}
    mask_file = tmp_path / "mask.safetensors"
    from safetensors.torch import save_file

    save_file(mask, str(mask_file))
    recipe = {
        "merge_method": "test_rebase",
        "base_model": str(new_dir),
        "models": [{"model": str(ft_dir), "parameters": {"weight": 0.5, "source": str(old_dir)}}],
        "parameters": {"mask": str(mask_file)},
    }
    plan = weightsmith.plan_merge(recipe, memory_budget="4KB")
    assert plan.compute_dtype == torch.float64
    assert any(u.rows for u in plan.units)  # row blocks: aux tensors must be cut the same way
    weightsmith.merge(recipe, tmp_path / "out", memory_budget="4KB")
    out = load_folder(tmp_path / "out")
    for k, v in out.items():
        expected = new[k].double() + 0.5 * (ft[k].double() - old[k].double()) * mask[k].double()
        assert torch.equal(v, expected.to(torch.bfloat16)), k


def test_checkpoint_parameter_must_be_a_plain_reference(tmp_path):
    base = save_model(tmp_path / "b", random_state(LLAMA_CONFIG, 1), LLAMA_CONFIG, shards=1)
    recipe = {
        "merge_method": "test_rebase",
        "base_model": str(base),
        "models": [{"model": str(base) + "/../b", "parameters": {"source": [str(base), str(base)]}}],
    }
    with pytest.raises(RecipeError, match="cannot vary by tensor"):
        weightsmith.plan_merge(recipe)
