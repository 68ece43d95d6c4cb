"""LiNeS (merge_method: lines): identities, hand-computed schedules, block parsing, the
auto-alpha statistics pass, and agreement with an independent in-memory reference."""

from __future__ import annotations

import json
import re

import pytest
import torch
from models import LLAMA_CONFIG, load_folder, make_family, perturb, random_state, save_model

import weightsmith
from weightsmith.errors import RecipeError
from weightsmith.ops.lines import find_blocks

L = LLAMA_CONFIG["num_hidden_layers"]


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    mag = x.abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def reference_lines(
    base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], alpha: float, beta: float, blocks: int
) -> dict[str, torch.Tensor]:
    """Straightforward single-task LiNeS in float64, block membership by the reference
    notebook's substring test (".layers.{i}." for i in range(L))."""
    out = {}
    for key in base:
        scale = alpha
        for i in range(blocks):
            if f".layers.{i}." in key:
                scale = alpha + beta * i / (blocks - 1)
        out[key] = base[key].double() + scale * (ft[key].double() - base[key].double())
    return out


def one_model(tmp_path, dtype=torch.bfloat16, **params):
    base_state = random_state(LLAMA_CONFIG, 0, dtype=dtype)
    ft_state = perturb(base_state, 1, scale=0.02)
    base = save_model(tmp_path / "base", base_state, LLAMA_CONFIG)
    ft = save_model(tmp_path / "ft", ft_state, LLAMA_CONFIG)
    recipe = {
        "merge_method": "lines",
        "base_model": str(base),
        "models": [{"model": str(ft)}],
        "parameters": params,
    }
    return base_state, ft_state, recipe


def test_alpha_one_beta_zero_returns_the_finetune(tmp_path):
    base_state, ft_state, recipe = one_model(tmp_path, alpha=1.0, beta=0.0)
    weightsmith.merge(recipe, tmp_path / "out")
    out = load_folder(tmp_path / "out")
    assert set(out) == set(ft_state)
    for k, v in out.items():
        assert torch.equal(v, ft_state[k]), k


def test_zero_scale_returns_the_base(tmp_path):
    base_state, _, recipe = one_model(tmp_path, alpha=0.0, beta=0.0)
    weightsmith.merge(recipe, tmp_path / "out")
    for k, v in load_folder(tmp_path / "out").items():
        assert torch.equal(v, base_state[k]), k


def test_hand_computed_schedule_float32(tmp_path):
    # L = 3 blocks: scales alpha, alpha + beta/2, alpha + beta; embeddings/norm/lm_head alpha.
    base_state, ft_state, recipe = one_model(tmp_path, dtype=torch.float32, alpha=0.2, beta=0.6)
    weightsmith.merge(recipe, tmp_path / "out")
    out = load_folder(tmp_path / "out")
    expected_scale = {"model.layers.0.": 0.2, "model.layers.1.": 0.2 + 0.3, "model.layers.2.": 0.2 + 0.6}
    seen = set()
    for k, v in out.items():
        scale = next((s for p, s in expected_scale.items() if k.startswith(p)), 0.2)
        seen.add(scale)
        tau = ft_state[k] - base_state[k]
        assert torch.equal(v, (tau * scale) + base_state[k]), k
    assert len(seen) == 3  # blocks and non-block tensors were both exercised


def test_beta_defaults_to_one_minus_alpha_for_one_model(tmp_path):
    base_state, ft_state, recipe = one_model(tmp_path, dtype=torch.float32, alpha=0.25)
    weightsmith.merge(recipe, tmp_path / "out")
    out = load_folder(tmp_path / "out")
    last = "model.layers.2.mlp.up_proj.weight"  # last block: 0.25 + 0.75 = 1, the fine-tune
    assert torch.allclose(out[last], ft_state[last], atol=1e-7, rtol=0)
    first = "model.layers.0.mlp.up_proj.weight"
    tau = ft_state[first] - base_state[first]
    assert torch.equal(out[first], tau * 0.25 + base_state[first])


@pytest.mark.parametrize("alpha, beta", [(0.3, 0.7), (0.0, 1.0), (0.5, 0.2)])
def test_single_task_matches_independent_reference_within_one_bf16_step(tmp_path, alpha, beta):
    base_state, ft_state, recipe = one_model(tmp_path, alpha=alpha, beta=beta)
    weightsmith.merge(recipe, tmp_path / "out")
    out = load_folder(tmp_path / "out")
    ref = reference_lines(base_state, ft_state, alpha, beta, L)
    for k, v in out.items():
        err = (v.double() - ref[k]).abs()
        assert bool((err <= bf16_ulp(ref[k])).all()), (k, float(err.max()))


def test_multi_task_ta_auto_alpha_is_one_over_t(tmp_path):
    base, models = make_family(tmp_path / "in", n_models=3, dtype=torch.float32)
    recipe = {
        "merge_method": "lines",
        "base_model": str(base),
        "models": [{"model": str(m)} for m in models],
        "parameters": {"beta": 0.4},
    }
    plan = weightsmith.plan_merge(recipe)
    assert any("statistics pass" in n for n in plan.notes)
    weightsmith.merge(recipe, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    alpha = report["summary"]["auto_alpha"]
    assert alpha == pytest.approx(1 / 3, rel=1e-12)
    base_state = load_folder(base)
    fts = [load_folder(m) for m in models]
    out = load_folder(tmp_path / "out")
    for k, v in out.items():
        m = re.search(r"layers\.(\d+)\.", k)
        scale = alpha + (0.4 * int(m.group(1)) / (L - 1) if m else 0.0)
        tau = sum(ft[k].double() - base_state[k].double() for ft in fts)
        expected = base_state[k].double() + scale * tau
        assert torch.allclose(v.double(), expected, atol=1e-6, rtol=1e-6), k


def test_multi_task_ties_model_scope_uses_ties_math_and_l1_rule(tmp_path):
    base, models = make_family(tmp_path / "in", n_models=3, dtype=torch.float32)
    ties = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m)} for m in models],
        "parameters": {"density": 0.2, "scope": "model", "weight": 1.0},
    }
    weightsmith.merge(ties, tmp_path / "ties")
    recipe = {
        **ties,
        "merge_method": "lines",
        "parameters": {"merge": "ties", "density": 0.2, "scope": "model", "beta": 0.5},
    }
    # Small budget: TIES' passes, the L1 pass and the output pass all run on row blocks.
    weightsmith.merge(recipe, tmp_path / "out", memory_budget="16KB")
    base_state = load_folder(base)
    fts = [load_folder(m) for m in models]
    merged = load_folder(tmp_path / "ties")
    tau_mtl = {k: merged[k].double() - base_state[k].double() for k in base_state}
    l1_sum = sum(
        float(sum(ft[k].double() - base_state[k].double() for ft in fts).abs().sum()) for k in base_state
    )
    l1_mtl = sum(float(t.abs().sum()) for t in tau_mtl.values())
    alpha = l1_sum / (3 * l1_mtl)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["summary"]["auto_alpha"] == pytest.approx(alpha, rel=1e-5)
    assert 1 / 3 < alpha < 1  # trimming and disjoint means shrink tau_MTL relative to the sum
    out = load_folder(tmp_path / "out")
    for k, v in out.items():
        m = re.search(r"layers\.(\d+)\.", k)
        scale = alpha + (0.5 * int(m.group(1)) / (L - 1) if m else 0.0)
        expected = base_state[k].double() + scale * tau_mtl[k]
        assert torch.allclose(v.double(), expected, atol=1e-6, rtol=0), k


def test_row_blocks_give_the_same_bits(tmp_path):
    base, models = make_family(tmp_path / "in", n_models=2)
    recipe = {
        "merge_method": "lines",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, (1.0, 0.5))],
        "parameters": {"beta": 0.3},
    }
    plan = weightsmith.plan_merge(recipe, memory_budget="4KB")
    assert any(u.rows for u in plan.units)
    weightsmith.merge(recipe, tmp_path / "a", memory_budget="4KB")
    weightsmith.merge(recipe, tmp_path / "b")
    a, b = load_folder(tmp_path / "a"), load_folder(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- block parsing
LLAMA_KEYS = list(random_state(LLAMA_CONFIG, 0))
BERT_KEYS = [
    "embeddings.word_embeddings.weight",
    "embeddings.LayerNorm.weight",
    *[f"encoder.layer.{i}.{p}" for i in range(6) for p in (
        "attention.self.query.weight", "attention.output.LayerNorm.bias", "output.dense.weight")],
    "pooler.dense.weight",
]
CLIP_KEYS = [
    "visual.conv1.weight",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.ln_pre.weight",
    *[f"visual.transformer.resblocks.{i}.{p}" for i in range(12) for p in (
        "attn.in_proj_weight", "ln_1.weight", "mlp.c_fc.weight")],
    "visual.ln_post.weight",
    "visual.proj",
]
GPT2_KEYS = ["transformer.wte.weight", *[f"transformer.h.{i}.attn.c_attn.weight" for i in range(4)],
             "transformer.ln_f.weight"]


@pytest.mark.parametrize(
    "keys, blocks, container",
    [(LLAMA_KEYS, L, "model.layers."), (BERT_KEYS, 6, "encoder.layer."),
     (CLIP_KEYS, 12, "resblocks."), (GPT2_KEYS, 4, "transformer.h.")],
)
def test_every_block_key_gets_its_block_and_the_rest_none(keys, blocks, container):
    _, _, block_of, n = find_blocks(keys, None)
    assert n == blocks
    for key in keys:
        if container in key:
            index = int(key.split(container)[1].split(".")[0])
            assert block_of[key] == index, key
        else:
            assert key not in block_of, key


def test_block_pattern_override_and_errors():
    keys = ["stem.weight", "stage.0.conv.weight", "stage.1.conv.weight", "stage.2.conv.weight", "head.weight"]
    with pytest.raises(RecipeError, match="block_pattern"):
        find_blocks(keys, None)  # no default pattern matches: an error, not "all outside blocks"
    _, _, block_of, n = find_blocks(keys, r"(?:^|\.)stage\.(\d+)\.")
    assert n == 3
    assert block_of == {"stage.0.conv.weight": 0, "stage.1.conv.weight": 1, "stage.2.conv.weight": 2}
    with pytest.raises(RecipeError, match="capture group"):
        find_blocks(keys, r"stage\.\d+\.")
    with pytest.raises(RecipeError, match="not a valid regex"):
        find_blocks(keys, r"stage\.(\d+")
    with pytest.raises(RecipeError, match="single block"):
        find_blocks(["a.stage.0.w", "b"], r"stage\.(\d+)\.")
    with pytest.raises(RecipeError, match="not a block number"):
        find_blocks(keys, r"(stage)\.")


def test_bad_recipes_fail_at_plan_time(tmp_path):
    base, models = make_family(tmp_path / "in", n_models=2)

    def recipe(params, n=2):
        return {
            "merge_method": "lines",
            "base_model": str(base),
            "models": [{"model": str(m)} for m in models[:n]],
            "parameters": params,
        }

    with pytest.raises(RecipeError, match="single-task LiNeS .* needs alpha"):
        weightsmith.plan_merge(recipe({}, n=1))
    with pytest.raises(RecipeError, match="needs beta"):
        weightsmith.plan_merge(recipe({}))
    with pytest.raises(RecipeError, match=re.escape("task_arithmetic | ties")):
        weightsmith.plan_merge(recipe({"beta": 0.1, "merge": "dare_ties"}))
    with pytest.raises(RecipeError, match="alpha: must be a number or auto"):
        weightsmith.plan_merge(recipe({"beta": 0.1, "alpha": "half"}))
    with pytest.raises(RecipeError, match="no tensor name matches"):
        weightsmith.plan_merge(recipe({"beta": 0.1, "block_pattern": r"blocks\.(\d+)\."}))
    with pytest.raises(RecipeError, match="takes no parameter `lambda`"):
        weightsmith.plan_merge(recipe({"beta": 0.1, "lambda": 0.5}), strict=True)
    with pytest.raises(RecipeError, match="density"):
        weightsmith.plan_merge(recipe({"beta": 0.1, "merge": "ties", "density": 1.5}))
