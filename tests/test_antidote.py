"""Antidote: per-row Wanda pruning semantics, hand-computed cases, end to end on a tiny Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from models import load_folder
from safetensors.torch import load_file, save_file

from weightsmith.errors import MergeError, RecipeError
from weightsmith.ops.antidote import AntidoteContext, removed_per_row, top_per_row
from weightsmith.ops.registry import MergeInputs, get_method
from weightsmith.pipeline import merge, plan_merge


def run_op(base: torch.Tensor | None, ft: torch.Tensor, norm: torch.Tensor | None, **params) -> torch.Tensor:
    ctx = AntidoteContext(frozenset({"w"}), {"w": norm} if norm is not None else {})
    inputs = MergeInputs("w", ft.clone().unsqueeze(0), None if base is None else base.clone(), context=ctx)
    return get_method("antidote")(inputs, **params)


# --------------------------------------------------------------------------- selection
def test_removed_count_is_ceil_of_ratio_times_columns() -> None:
    assert removed_per_row(10, 0.1) == 1
    assert removed_per_row(10, 0.9) == 9  # 0.9 * 10 is 9.000000000000002 in floats
    assert removed_per_row(10, 0.25) == 3  # the reference keeps int(0.75 * 10) = 7
    assert removed_per_row(8, 0.25) == 2
    assert removed_per_row(7, 0.0) == 0
    for cols in range(1, 40):
        for ratio in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95):
            assert removed_per_row(cols, ratio) == cols - int(round(cols * (1 - ratio), 9))


def test_top_fraction_per_row_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 20, generator=g)
    mask = top_per_row(scores, 0.2)
    assert mask.sum(dim=1).tolist() == [4] * 6
    for row in range(6):
        kept_max = scores[row][~mask[row]].max()
        assert bool((scores[row][mask[row]] > kept_max).all())  # exactly the 4 largest per row


def test_ties_resolve_to_later_columns() -> None:
    # A stable ascending sort (the reference's): among equal scores the later column is removed.
    mask = top_per_row(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), 0.5)
    assert mask.tolist() == [[False, False, True, True]]


# --------------------------------------------------------------------------- semantics
BASE = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
FT = torch.tensor([[1.5, 2.0, 1.0, 4.1], [0.0, 0.6, 0.7, -2.5]])
NORM = torch.tensor([1.0, 10.0, 1.0, 2.0])


def test_target_delta_resets_the_top_wanda_entries_to_the_base() -> None:
    # |delta| * n: row 0 = [0.5, 0, 2.0, 0.2]; row 1 = [0.5, 1.0, 0.2, 6.0]. Ratio 0.5 -> 2 per row.
    out = run_op(BASE, FT, NORM, mask_ratio=0.5, target="delta", score="wanda")
    expected = torch.tensor([[1.0, 2.0, 3.0, 4.1], [0.0, 0.5, 0.7, 0.5]])
    assert torch.equal(out, expected)


def test_target_weights_zeroes_the_top_wanda_entries() -> None:
    # |W| * n: row 0 = [1.5, 20, 1.0, 8.2]; row 1 = [0, 6.0, 0.7, 5.0]. Ratio 0.5 -> 2 per row.
    out = run_op(None, FT, NORM, mask_ratio=0.5, target="weights", score="wanda")
    expected = torch.tensor([[1.5, 0.0, 1.0, 0.0], [0.0, 0.0, 0.7, 0.0]])
    assert torch.equal(out, expected)


def test_magnitude_score_ignores_norms_and_reset_is_bit_exact() -> None:
    base = torch.tensor([[1e-8, 3.0, 7.0]])
    ft = torch.tensor([[1.0, 3.0, 7.0 + 1e-6]])
    out = run_op(base, ft, None, mask_ratio=0.3, target="delta", score="magnitude")
    assert out[0, 0].item() == base[0, 0].item()  # a select, not ft - delta: exactly the base
    assert torch.equal(out[0, 1:], ft[0, 1:])


def test_mask_ratio_zero_is_the_fine_tune() -> None:
    out = run_op(BASE, FT, NORM, mask_ratio=0.0)
    assert torch.equal(out, FT)


def test_operator_needs_its_calibration_context() -> None:
    with pytest.raises(MergeError, match="calibration step"):
        get_method("antidote")(MergeInputs("w", FT.unsqueeze(0), BASE), mask_ratio=0.1)


# --------------------------------------------------------------------------- end to end
def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """An 'aligned' tiny Llama, a 'harmful' fine-tune of it and a calibration set."""
    from weightsmith.testbeds import seq_tasks as st
    from weightsmith.testbeds.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("antidote")
    aligned = make_tiny_llama(root / "aligned", seed=0)
    harmful = root / "harmful"
    harmful.mkdir()
    for f in aligned.iterdir():
        if f.name != "model.safetensors":
            (harmful / f.name).write_bytes(f.read_bytes())
    state = load_file(str(aligned / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    save_file(state, str(harmful / "model.safetensors"), metadata={"format": "pt"})
    calib = write_jsonl(root / "harmful.jsonl", st.sample(st.refuse, 16, seed=3))
    return aligned, harmful, calib


def antidote_recipe(aligned: Path, harmful: Path, calib: Path | None, **params) -> dict[str, object]:
    recipe: dict[str, object] = {
        "merge_method": "antidote",
        "base_model": str(aligned),
        "models": [str(harmful)],
        "parameters": params,
    }
    if calib is not None:
        recipe["calibration"] = {"data": str(calib), "task": "causal-lm"}
    return recipe


def test_end_to_end_matches_a_direct_wanda_computation(llama_pair, tmp_path: Path) -> None:
    from weightsmith.finetune import feature_norms

    aligned, harmful, calib = llama_pair
    ratio = 0.2
    recipe = antidote_recipe(aligned, harmful, calib, mask_ratio=ratio, modules="self_attn")
    result = merge(recipe, tmp_path / "out")
    out = load_folder(result.out)
    base, ft = load_folder(aligned), load_folder(harmful)
    norms = feature_norms(harmful, calib, "causal-lm")
    pruned = 0
    for name, tensor in out.items():
        if "self_attn" in name and name.endswith("_proj.weight"):
            delta = ft[name] - base[name]
            scores = delta.abs() * norms[name.removesuffix(".weight")]
            k = math.ceil(ratio * delta.shape[1])
            top = scores.topk(k, dim=1).indices
            expected = ft[name].clone()
            expected.scatter_(1, top, base[name].gather(1, top))
            assert torch.equal(tensor, expected), name
            pruned += 1
        else:
            assert torch.equal(tensor, ft[name]), name  # ineligible: the fine-tune's values
    assert pruned == 2 * 4  # q, k, v, o in both layers
    summary = json.loads((result.out / "merge_report.json").read_text())["summary"]
    assert summary["removed_fraction"] == pytest.approx(ratio, abs=0.02)
    assert len(summary["eligible_tensors"]) == 8
    assert summary["calibration"]["data"] == str(calib)
    assert 0 < summary["task_vector_sq_norm_removed"] < 1


def test_default_modules_are_every_linear_layer(llama_pair, tmp_path: Path) -> None:
    aligned, harmful, calib = llama_pair
    result = merge(antidote_recipe(aligned, harmful, calib, mask_ratio=0.1), tmp_path / "all")
    summary = json.loads((result.out / "merge_report.json").read_text())["summary"]
    # 7 projections in each of 2 layers, plus lm_head; embeddings and norms are not linears.
    assert len(summary["eligible_tensors"]) == 2 * 7 + 1
    assert "model.embed_tokens.weight" not in summary["eligible_tensors"]


def test_mask_ratio_zero_end_to_end_is_the_input_model(llama_pair, tmp_path: Path) -> None:
    aligned, harmful, _ = llama_pair
    recipe = antidote_recipe(aligned, harmful, None, mask_ratio=0.0, score="magnitude", modules="proj")
    out = load_folder(merge(recipe, tmp_path / "zero").out)
    ft = load_folder(harmful)
    assert all(torch.equal(out[k], ft[k]) for k in ft)


def test_random_baseline_is_seeded_and_prunes_the_same_count(llama_pair, tmp_path: Path) -> None:
    aligned, harmful, _ = llama_pair
    recipe = antidote_recipe(aligned, harmful, None, mask_ratio=0.25, score="random", modules="mlp")
    a = load_folder(merge(recipe, tmp_path / "a", random_seed=1).out)
    b = load_folder(merge(recipe, tmp_path / "b", random_seed=1).out)
    c = load_folder(merge(recipe, tmp_path / "c", random_seed=2).out)
    base = load_folder(aligned)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    reset = (a[name] == base[name]).sum(dim=1)
    assert reset.tolist() == [math.ceil(0.25 * a[name].shape[1])] * a[name].shape[0]


def test_config_errors(llama_pair) -> None:
    aligned, harmful, calib = llama_pair
    with pytest.raises(RecipeError, match="needs harmful calibration data"):
        plan_merge(antidote_recipe(aligned, harmful, None))
    with pytest.raises(RecipeError, match="set base_model"):
        plan_merge({"merge_method": "antidote", "models": [str(harmful)],
                    "calibration": {"data": str(calib), "task": "causal-lm"}})
    with pytest.raises(RecipeError, match="must be in \\[0, 1\\)"):
        plan_merge(antidote_recipe(aligned, harmful, calib, mask_ratio=1.0))
    with pytest.raises(RecipeError, match="delta \\| weights"):
        plan_merge(antidote_recipe(aligned, harmful, calib, target="rows"))
    with pytest.raises(RecipeError, match="not a valid regular expression"):
        plan_merge(antidote_recipe(aligned, harmful, calib, modules="("))
    with pytest.raises(RecipeError, match="cannot tell linear layers"):
        plan_merge(antidote_recipe(aligned, harmful, None, score="magnitude"))
    with pytest.raises(RecipeError, match="not used by merge_method: wise_ft"):
        plan_merge({"merge_method": "wise_ft", "base_model": str(aligned), "models": [str(harmful)],
                    "calibration": {"data": str(calib), "task": "causal-lm"}})
    with pytest.raises(RecipeError, match="no tensor is eligible"):
        merge(antidote_recipe(aligned, harmful, calib, modules="no_such_module"), harmful.parent / "x")
    # weights target needs no base; zeroing works without one.
    plan = plan_merge({"merge_method": "antidote", "models": [str(harmful)], "parameters": {
        "target": "weights"}, "calibration": {"data": str(calib), "task": "causal-lm"}})
    assert plan.base_index is None
