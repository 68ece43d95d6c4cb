"""`slices:` and `modules:` recipes: stacking, full-range slices, precedence, gradients, memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from models import LLAMA_CONFIG, load_folder, perturb, random_state, save_model

from weightsmith.errors import RecipeError
from weightsmith.pipeline import merge, plan_merge

SIX = {**LLAMA_CONFIG, "num_hidden_layers": 6, "layer_types": [f"kind{i}" for i in range(6)]}
LAYER_KEYS = ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight")


@pytest.fixture
def six(tmp_path):
    """A 6-layer tiny Llama base and two fine-tunes, bf16, each layer's layer_types distinct."""
    base_state = random_state(SIX, seed=0)
    base = save_model(tmp_path / "base", base_state, SIX)
    a = save_model(tmp_path / "a", perturb(base_state, 1), SIX)
    b = save_model(tmp_path / "b", perturb(base_state, 2), SIX, shards=1)
    return base, a, b


def _run(recipe, out, **kw):
    result = merge(recipe, out, overwrite=True, **kw)
    return load_folder(result.out), json.loads((result.out / "config.json").read_text()), result


def _layer(state, i, key):
    return state[f"model.layers.{i}.{key}"]


def test_stacking_renames_layers_and_updates_config(six, tmp_path):
    _, a, b = six
    recipe = {
        "merge_method": "passthrough",
        "dtype": "bfloat16",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(b), "layer_range": [2, 5]}]},
        ],
    }
    out, config, result = _run(recipe, tmp_path / "out")
    sa, sb = load_folder(a), load_folder(b)
    assert config["num_hidden_layers"] == 6
    assert config["layer_types"] == ["kind0", "kind1", "kind2", "kind2", "kind3", "kind4"]
    for i, (src, j) in enumerate([(sa, 0), (sa, 1), (sa, 2), (sb, 2), (sb, 3), (sb, 4)]):
        for key in LAYER_KEYS:
            assert torch.equal(_layer(out, i, key), _layer(src, j, key)), (i, key)
    # Embeddings from the first slice's model, final norm and head from the last slice's.
    assert torch.equal(out["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], sb["model.norm.weight"])
    assert torch.equal(out["lm_head.weight"], sb["lm_head.weight"])
    assert len(out) == 2 + 6 * 9 + 1
    notes = "\n".join(result.plan.notes)
    assert f"0-2 <- {a}:0-2" in notes and f"3-5 <- {b}:2-4" in notes


def test_layer_map_joins_contiguous_slices(six):
    _, a, _ = six
    plan = plan_merge(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(a), "layer_range": [2, 4]}]},
                {"sources": [{"model": str(a), "layer_range": [1, 2]}]},
            ],
        }
    )
    assert plan.notes[1:3] == [f"  0-3 <- {a}:0-3", f"  4 <- {a}:1"]
    assert plan.config_updates["num_hidden_layers"] == 5


def _slerp_models(base, a, params=None):
    return {
        "merge_method": "slerp",
        "base_model": str(base),
        "dtype": "bfloat16",
        "models": [{"model": str(base)}, {"model": str(a)}],
        "parameters": params
        or {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
    }


def test_single_full_range_slice_equals_models_recipe_bytes(six, tmp_path):
    base, a, _ = six
    models_recipe = _slerp_models(base, a)
    sliced = {**models_recipe}
    del sliced["models"]
    sliced["slices"] = [
        {"sources": [{"model": str(base), "layer_range": [0, 6]}, {"model": str(a), "layer_range": [0, 6]}]}
    ]
    r1 = merge(models_recipe, tmp_path / "m", overwrite=True)
    r2 = merge(sliced, tmp_path / "s", overwrite=True)
    files1 = sorted(p.name for p in r1.out.glob("*.safetensors"))
    assert files1 == sorted(p.name for p in r2.out.glob("*.safetensors"))
    for name in files1:
        assert (r1.out / name).read_bytes() == (r2.out / name).read_bytes(), name
    # modules: {default: {slices: ...}} is the same recipe again.
    moduled = {k: v for k, v in sliced.items() if k != "slices"}
    moduled["modules"] = {"default": {"slices": sliced["slices"]}}
    r3 = merge(moduled, tmp_path / "d", overwrite=True)
    for name in files1:
        assert (r1.out / name).read_bytes() == (r3.out / name).read_bytes(), name


def test_parameter_precedence_source_over_slice_over_module_over_global(six, tmp_path):
    _, a, b = six
    sa, sb = load_folder(a), load_folder(b)
    key = "model.layers.0.self_attn.q_proj.weight"

    def weights(recipe):
        out, _, _ = _run(
            {
                "merge_method": "linear",
                "dtype": "float32",
                "out_dtype": "float32",
                "parameters": {"normalize": False},
                **recipe,
            },
            tmp_path / "o",
        )
        return out[key]

    def srcs(pa=None, pb=None, rng=(0, 2)):
        return [
            {"model": str(a), "layer_range": list(rng), **({"parameters": pa} if pa else {})},
            {"model": str(b), "layer_range": list(rng), **({"parameters": pb} if pb else {})},
        ]

    def expect(wa, wb):
        return wa * sa[key].float() + wb * sb[key].float()

    base = {"slices": [{"sources": srcs(), "parameters": {"weight": 0.25}}]}
    base["parameters"] = {"normalize": False, "weight": 1.0}
    got = weights(base)
    assert torch.allclose(got, expect(0.25, 0.25), atol=1e-6)  # slice over global
    got = weights({"slices": [{"sources": srcs({"weight": 0.75}), "parameters": {"weight": 0.25}}]})
    assert torch.allclose(got, expect(0.75, 0.25), atol=1e-6)  # source over slice
    # A source filter that does not match falls through to the slice's setting.
    miss = {"weight": [{"filter": "mlp", "value": 0.9}]}
    got = weights({"slices": [{"sources": srcs(miss), "parameters": {"weight": 0.5}}]})
    assert torch.allclose(got, expect(0.5, 0.5), atol=1e-6)
    # Module parameters sit between the slice and the global parameters.
    got = weights(
        {
            "modules": {
                "default": {"slices": [{"sources": srcs({"weight": 0.1})}], "parameters": {"weight": 0.3}}
            }
        }
    )
    assert torch.allclose(got, expect(0.1, 0.3), atol=1e-6)


def test_gradients_interpolate_over_each_slice(six, tmp_path):
    _, a, b = six
    recipe = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "out_dtype": "float32",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 3], "parameters": {"scale": [0.0, 1.0]}}]},
            {"sources": [{"model": str(b), "layer_range": [3, 4]}], "parameters": {"scale": [0.0, 2.0]}},
        ],
    }
    out, config, _ = _run(recipe, tmp_path / "g")
    sa, sb = load_folder(a), load_folder(b)
    key = "mlp.up_proj.weight"
    for i, scale in enumerate([0.0, 0.5, 1.0]):
        assert torch.allclose(_layer(out, i, key), scale * _layer(sa, i, key).float()), i
    # A one-layer slice sits at t = 1 (mergekit); outside tensors at t = 0.
    assert torch.allclose(_layer(out, 3, key), 2.0 * _layer(sb, 3, key).float())
    assert not out["model.embed_tokens.weight"].any()
    assert not out["lm_head.weight"].any()
    assert config["num_hidden_layers"] == 4


def test_per_slice_base_model(six, tmp_path):
    base, a, b = six
    recipe = {
        "merge_method": "task_arithmetic",
        "dtype": "float32",
        "out_dtype": "float32",
        "base_model": str(base),
        "parameters": {"weight": 1.0},
        "slices": [
            {
                "sources": [
                    {"model": str(base), "layer_range": [0, 2]},
                    {"model": str(a), "layer_range": [0, 2]},
                ]
            },
            {
                "base_model": str(a),
                "sources": [
                    {"model": str(a), "layer_range": [2, 4]},
                    {"model": str(b), "layer_range": [2, 4]},
                ],
            },
        ],
    }
    out, _, result = _run(recipe, tmp_path / "t")
    s0, sa, sb = load_folder(base), load_folder(a), load_folder(b)
    key = "self_attn.v_proj.weight"
    assert torch.allclose(_layer(out, 0, key), _layer(sa, 0, key).float())  # base + (a - base)
    assert torch.allclose(_layer(out, 3, key), _layer(sb, 3, key).float())  # a + (b - a)
    task = next(t for t in result.plan.tasks if t.name == "model.layers.3." + key)
    assert [result.plan.checkpoints[t.ckpt].ref for t in [task.base]] == [str(a)]
    del s0


def test_recipe_shape_errors(six):
    _, a, b = six
    with pytest.raises(RecipeError, match="exactly one of `models`, `slices` or `modules`"):
        plan_merge(
            {
                "merge_method": "linear",
                "models": [{"model": str(a)}],
                "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]}],
            }
        )
    with pytest.raises(RecipeError, match="same number of layers"):
        plan_merge(
            {
                "merge_method": "linear",
                "slices": [
                    {
                        "sources": [
                            {"model": str(a), "layer_range": [0, 2]},
                            {"model": str(b), "layer_range": [0, 3]},
                        ]
                    }
                ],
            }
        )
    with pytest.raises(RecipeError, match="slices\\[0\\].parameters.wieght"):
        plan_merge(
            {
                "merge_method": "linear",
                "slices": [
                    {
                        "parameters": {"wieght": 1},
                        "sources": [
                            {"model": str(a), "layer_range": [0, 2]},
                            {"model": str(b), "layer_range": [1, 3]},
                        ],
                    }
                ],
            }
        )
    with pytest.raises(RecipeError, match="knows no modules of architecture 'LlamaForCausalLM'"):
        plan_merge(
            {
                "merge_method": "linear",
                "modules": {
                    "text": {"models": [{"model": str(a)}]},
                    "vision": {"models": [{"model": str(b)}]},
                },
            }
        )


def test_frankenmerge_stays_within_a_tiny_memory_budget(six, tmp_path):
    """A 12-layer stack of a 6-layer model, merged under a budget far below the model size:
    planned as row blocks of aligned layer tensors like any merge."""
    _, a, b = six
    recipe = {
        "merge_method": "linear",
        "dtype": "bfloat16",
        "parameters": {"weight": 0.5},
        "slices": [
            {
                "sources": [
                    {"model": str(a), "layer_range": [k, k + 3]},
                    {"model": str(b), "layer_range": [k + 1, k + 4]},
                ]
            }
            for k in (0, 2, 1, 0)
        ],
    }
    budget = 40_000
    plan = plan_merge(recipe, memory_budget=budget)
    model_bytes = sum(t.out_bytes for t in plan.tasks)
    assert model_bytes > 4 * budget
    assert plan.peak_estimate <= budget and not plan.oversize
    result = merge(recipe, tmp_path / "f", overwrite=True, memory_budget=budget)
    assert json.loads((result.out / "config.json").read_text())["num_hidden_layers"] == 12
    assert result.stats.bytes_written >= model_bytes


VLM_CONFIG = {
    "architectures": ["Mistral3ForConditionalGeneration"],
    "model_type": "mistral3",
    "text_config": {"model_type": "mistral", "num_hidden_layers": 4, "hidden_size": 8},
    "vision_config": {"model_type": "pixtral", "num_hidden_layers": 3, "hidden_size": 4},
}


def _vlm_state(seed: int) -> dict[str, torch.Tensor]:
    """A Mistral3-shaped tiny VLM: language_model.*, vision_tower.*, multi_modal_projector.*."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "language_model.model.embed_tokens.weight": (16, 8),
        "language_model.model.norm.weight": (8,),
        "language_model.lm_head.weight": (16, 8),
        "vision_tower.patch_conv.weight": (4, 3),
        "vision_tower.ln_pre.weight": (4,),
        "multi_modal_projector.linear_1.weight": (8, 4),
    }
    for i in range(4):
        state[f"language_model.model.layers.{i}.mlp.up_proj.weight"] = (8, 8)
    for i in range(3):
        state[f"vision_tower.transformer.layers.{i}.ffn_norm.weight"] = (4,)
    return {k: torch.randn(shape, generator=g) for k, shape in state.items()}


def vlm_recipe(a, b) -> dict:
    """Two VLM folders merged by module: the text decoder stacked (6 layers), the vision tower
    averaged with its own module weight, the projector taken from b."""
    return {
        "merge_method": "linear",
        "dtype": "float32",
        "parameters": {"weight": 1.0},
        "modules": {
            "text_decoder": {
                "slices": [
                    {"sources": [{"model": str(a), "layer_range": [0, 4]}]},
                    {"sources": [{"model": str(b), "layer_range": [2, 4]}]},
                ]
            },
            "vision_tower": {"models": [{"model": str(a)}, {"model": str(b)}], "parameters": {"weight": 0.5}},
            "multi_modal_projector": {"models": [{"model": str(b)}]},
        },
    }


def test_two_modules_text_and_vision(tmp_path):
    a = save_model(tmp_path / "vlm_a", _vlm_state(1), VLM_CONFIG, shards=1)
    b = save_model(tmp_path / "vlm_b", _vlm_state(2), VLM_CONFIG, shards=1)
    recipe = vlm_recipe(a, b)
    out, config, result = _run(recipe, tmp_path / "vlm")
    sa, sb = load_folder(a), load_folder(b)
    assert config["text_config"]["num_hidden_layers"] == 6
    assert config["vision_config"]["num_hidden_layers"] == 3
    up = "language_model.model.layers.{}.mlp.up_proj.weight"
    for i, (src, j) in enumerate([(sa, 0), (sa, 1), (sa, 2), (sa, 3), (sb, 2), (sb, 3)]):
        assert torch.equal(out[up.format(i)], src[up.format(j)]), i
    assert torch.equal(
        out["language_model.model.embed_tokens.weight"], sa["language_model.model.embed_tokens.weight"]
    )
    assert torch.equal(out["language_model.lm_head.weight"], sb["language_model.lm_head.weight"])
    for k in sa:
        if k.startswith("vision_tower."):
            assert torch.allclose(out[k], (sa[k] + sb[k]) / 2), k
    assert torch.equal(
        out["multi_modal_projector.linear_1.weight"], sb["multi_modal_projector.linear_1.weight"]
    )
    assert len(out) == 3 + 6 + 2 + 3 + 1  # text: 3 outside + 6 layers; vision: 2 + 3; projector
    with pytest.raises(RecipeError, match="list multi_modal_projector too"):
        plan_merge(
            {
                **recipe,
                "modules": {k: v for k, v in recipe["modules"].items() if k != "multi_modal_projector"},
            }
        )


@pytest.mark.slow  # a child process merging 40 MB: ~100 s on two busy cores
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_frankenmerge_peak_memory_measured_under_budget(tmp_path):
    """Measured as tests/test_memory_budget.py measures it (peak RSS growth of a child
    process): a 10-layer stack of two 4-layer models, 4 MB tensors, under an 8 MiB budget."""
    from test_memory_budget import CHILD, _model

    rows = 2048  # 5 tensors x 2048 x 1024 bf16 = 21 MB per model
    a, b = _model(tmp_path / "a", 1, rows), _model(tmp_path / "b", 2, rows)

    def stack(x, y):
        return {"merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
                "parameters": {"weight": 0.5},
                "slices": [{"sources": [{"model": str(x), "layer_range": [0, 3]},
                                        {"model": str(y), "layer_range": [1, 4]}]},
                           {"sources": [{"model": str(y), "layer_range": [0, 4]}]},
                           {"sources": [{"model": str(x), "layer_range": [1, 4]},
                                        {"model": str(y), "layer_range": [0, 3]}]}]}

    (tmp_path / "r.yaml").write_text(json.dumps(stack(a, b)))
    ta, tb = _model(tmp_path / "ta", 1, 64), _model(tmp_path / "tb", 2, 64)
    (tmp_path / "warm.yaml").write_text(json.dumps(stack(ta, tb)))
    budget = 8 * 2**20
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "r.yaml"), str(tmp_path / "out"), str(budget),
         str(tmp_path / "warm.yaml"), str(tmp_path / "warm")],
        capture_output=True, text=True, check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    written = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert written > 5 * budget  # the output is several times the budget
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 10
    growth = figures["peak"] - figures["baseline"]
    print(f"frankenmerge: peak RSS growth {growth / 2**20:.1f} MiB under a {budget / 2**20:.0f} MiB budget")
    assert growth <= budget, figures


def test_sources_take_revisions_and_are_opened_once():
    from weightsmith.recipe import load_recipe

    recipe = load_recipe({
        "merge_method": "slerp", "base_model": "org/base@v2",
        "slices": [{"sources": [{"model": "org/base@v2", "layer_range": [0, 2]},
                                {"model": {"model": {"path": "org/ft", "revision": "abc123"}},
                                 "layer_range": [0, 2]}]},
                   {"sources": [{"model": "org/base@v2", "layer_range": [2, 4]},
                                {"model": "org/ft@abc123", "layer_range": [1, 3]}]}],
    })
    assert [m.ref for m in recipe.models] == ["org/base@v2", "org/ft@abc123"]
    assert recipe.slices[0].sources[1].ref == "org/ft@abc123"


def test_per_model_filters_match_the_input_tensor_name(six, tmp_path):
    """As mergekit: a source's filter sees its own tensor name (layers.2 of the input is
    output layer 0 here); shared parameters see the output name."""
    _, a, _ = six
    recipe = {"merge_method": "passthrough", "dtype": "float32", "out_dtype": "float32",
              "slices": [{"sources": [{"model": str(a), "layer_range": [2, 4],
                                       "parameters": {"scale": [{"filter": "layers.2.", "value": 0.0},
                                                                {"value": 1.0}]}}]}]}
    out, _, _ = _run(recipe, tmp_path / "f")
    sa = load_folder(a)
    assert not _layer(out, 0, "mlp.up_proj.weight").any()
    assert torch.equal(_layer(out, 1, "mlp.up_proj.weight"), _layer(sa, 3, "mlp.up_proj.weight").float())


def test_a_slice_of_the_base_alone_gives_the_base(six, tmp_path):
    """mergekit accepts a slice whose one source is the base (the task vector is zero): the
    output is the base, for the full-range and the stacked form."""
    base, _, _ = six
    for rng in ([0, 6], [1, 3]):
        recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
                  "parameters": {"normalize": False},
                  "slices": [{"sources": [{"model": str(base), "layer_range": rng,
                                           "parameters": {"weight": 1.0}}]}]}
        out, config, _ = _run(recipe, tmp_path / f"b{rng[0]}")
        sb = load_folder(base)
        assert config["num_hidden_layers"] == rng[1] - rng[0]
        for i in range(rng[1] - rng[0]):
            for key in LAYER_KEYS:
                assert torch.equal(_layer(out, i, key), _layer(sb, rng[0] + i, key)), (rng, i, key)


def test_a_base_source_needs_no_weight(six, tmp_path):
    """The base listed among a slice's sources without `weight` (Edens-Gate/Holland-Magnum-Merge-R2,
    tests/recipes_in_the_wild/077): its task vector is zero, so mergekit never reads its weight.
    The full-range form equals the models: recipe; the stacked form plans too."""
    base, a, b = six
    sources = [{"model": str(base)},
               {"model": str(a), "parameters": {"weight": 0.5}},
               {"model": str(b), "parameters": {"weight": 0.5}}]
    models_recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
                     "parameters": {"normalize": False}, "models": sources}
    want, _, _ = _run(models_recipe, tmp_path / "m")
    for rng in ([0, 6], [2, 5]):
        sliced = {k: v for k, v in models_recipe.items() if k != "models"}
        sliced["slices"] = [{"sources": [{**s, "layer_range": rng} for s in sources]}]
        out, config, _ = _run(sliced, tmp_path / f"s{rng[0]}")
        assert config["num_hidden_layers"] == rng[1] - rng[0]
        for i in range(rng[1] - rng[0]):
            for key in LAYER_KEYS:
                assert torch.equal(_layer(out, i, key), _layer(want, rng[0] + i, key)), (rng, i, key)
