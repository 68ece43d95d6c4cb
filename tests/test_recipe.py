import pytest

from weightsmith.errors import RecipeError
from weightsmith.recipe import load_recipe
from weightsmith.recipe_settings import Conditional, resolve_setting


def test_scalar_gradient_and_filters_resolve_like_mergekit():
    assert resolve_setting(0.5, "x", 0.7) == 0.5
    # piecewise-linear over t in [0, 1]
    assert resolve_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert resolve_setting([0.0, 1.0, 0.0], "x", 0.5) == pytest.approx(1.0)
    assert resolve_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert resolve_setting([2.0, 4.0], "x", 1.0) == 4.0
    # non-numeric lists pick floor(t * (n - 1))
    assert resolve_setting(["a", "b", "c"], "x", 0.99) == "b"
    conds = [Conditional("lm_head", 0.0), Conditional(None, [0.5, 1.0])]
    assert resolve_setting(conds, "lm_head.weight", 0.0) == 0.0
    assert resolve_setting(conds, "model.layers.1.mlp.weight", 1.0) == 1.0
    assert resolve_setting([Conditional("mlp", 1.0)], "attn", 0.0) is None
    assert resolve_setting([Conditional("*", 3.0)], "attn", 0.0) == 3.0


def test_load_recipe_accepts_mergekit_format():
    r = load_recipe(
        """
merge_method: task_arithmetic
base_model: org/base
models:
  - model: org/a
    parameters:
      weight: [0.2, 0.8]
  - model: org/b@main
    parameters:
      weight:
        - filter: lm_head
          value: 0
        - value: -0.5
parameters:
  lambda: 0.7
dtype: bfloat16
out_dtype: float16
"""
    )
    assert r.merge_method == "task_arithmetic"
    assert r.base_model == "org/base"
    assert [m.ref for m in r.models] == ["org/a", "org/b@main"]
    assert r.models[1].parameters["weight"][0] == Conditional("lm_head", 0)
    assert str(r.dtype) == "torch.bfloat16" and str(r.out_dtype) == "torch.float16"
    assert str(r.compute_dtype) == "torch.float32"  # never compute in 16 bits


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("merge_method: linear\nmodels: []\n", "`models` must be a non-empty list"),
        ("models: [{model: a}]\n", "`merge_method` is required"),
        ("merge_method: linear\nmodels: [{model: a}]\ndtype: int3\n", "unknown dtype 'int3'"),
        ("merge_method: linear\nmodels: [a]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n",
         "exactly one of `models`, `slices` or `modules`"),
        ("merge_method: linear\nslices: [{sources: [{model: a, layer_range: [2, 1]}]}]\n", "layer_range"),
        ("merge_method: linear\nslices: [{sources: [{model: a}]}]\n", "needs `model:` and `layer_range"),
        ("merge_method: linear\nmodels: [{model: a}]\nvocab_policy: grow\n", "vocab_policy"),
        ("merge_method: linear\nmodels: [{model: a}]\ntokenizer: {pad_to_multiple_of: 0}\n",
         "pad_to_multiple_of must be a positive integer"),
        ("merge_method: linear\nmodels: [{model: a}]\ntokenizer: {tokens: {x: {source: {kind: one}}}}\n",
         "tokenizer.tokens['x']"),
        ("merge_method: linear\nmodels: [{model: a}]\ntokenizer: {}\ntokenizer_source: base\n", "not both"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: []}}]\n", "empty list"),
        ("- a\n- b\n", "a recipe is a mapping"),
        ("merge_method: [linear\n", "not valid YAML"),
    ],
)
def test_bad_recipes_name_the_field(text, fragment):
    with pytest.raises(RecipeError) as e:
        load_recipe(text)
    assert fragment in str(e.value)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("nope.yaml")


def test_recipe_from_dict_keeps_raw_for_provenance():
    raw = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]}
    r = load_recipe(raw)
    assert "merge_method: linear" in r.to_yaml()
    raw["merge_method"] = "changed"
    assert r.merge_method == "linear"


def test_recipe_text_is_kept_verbatim_with_comments(tmp_path):
    text = "# my merge\nmerge_method: linear  # soup\nmodels:\n  - model: a\n"
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert load_recipe(path).to_yaml() == text
    assert load_recipe(text).to_yaml() == text


def test_a_repeated_model_is_merged_as_listed_and_said():
    """Vortex5/MegaMoon-Karcher-12B lists Vortex5/Lunar-Nexus-12B twice (recipes_in_the_wild/069):
    mergekit before 0.1.5 merged it once, 0.1.5 refuses. weightsmith merges both entries (a repeat
    is an input like any other: a soup of identical fine-tunes is a legitimate test) and warns,
    naming both entries and how to get mergekit's old result."""
    raw = {"merge_method": "karcher", "models": [{"model": "a"}, {"model": "b"}, {"model": "a"}]}
    r = load_recipe(raw)
    assert [m.ref for m in r.models] == ["a", "b", "a"]
    said = "models[2] (a) repeats models[0]: both entries are merged"
    assert any(said in w for w in r.warnings), r.warnings
    assert load_recipe(raw, strict=True).models == r.models  # not something mergekit ignores
