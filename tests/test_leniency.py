"""What mergekit silently ignores, weightsmith accepts with one warning naming the field and its
closest known name; --strict makes each an error. Wrong values stay errors."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from models import load_folder

import weightsmith
from weightsmith.cli import main
from weightsmith.errors import RecipeError
from weightsmith.notices import collecting, did_you_mean, warn
from weightsmith.recipe import load_recipe


def linear(models, **extra):
    entries = [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]
    return {"merge_method": "linear", "models": entries, **extra}


def test_warn_prints_once_per_collection_and_collects(capsys):
    with collecting() as outer:
        warn("a thing")
        with collecting() as inner:
            warn("a thing")  # said already in the outer collection: collected, not printed again
            warn("another")
    assert outer == ["a thing", "another"] and inner == ["a thing", "another"]
    assert capsys.readouterr().err == "weightsmith: warning: a thing\nweightsmith: warning: another\n"
    with collecting(echo=False) as quiet:
        warn("silent")
    assert quiet == ["silent"] and capsys.readouterr().err == ""


def test_did_you_mean():
    assert did_you_mean("dype", ["dtype", "models"]) == "; did you mean `dtype`?"
    assert did_you_mean("zzz", ["dtype"]) == ""


def test_typo_top_level_key_warns_with_closest_field(capsys):
    recipe = load_recipe("merge_method: linear\nmodels: [{model: a}]\ndype: float32\n")
    expected = "recipe: `dype` is not a recipe field; did you mean `dtype`? ignored"
    assert recipe.warnings == [expected]
    assert f"weightsmith: warning: {expected}\n" in capsys.readouterr().err
    assert recipe.dtype is None  # ignored, as mergekit does


def test_unknown_keys_hint_where_they_belong():
    recipe = load_recipe(
        "merge_method: sce\nmodels: [{model: a}]\nselect_topk: 0.15\npad_to_multiple_of: 8\n"
    )
    assert recipe.warnings == [
        "recipe: `select_topk` is not a recipe field (a method's parameters go under `parameters:`); ignored",
        "recipe: `pad_to_multiple_of` is not a recipe field (it belongs in the `tokenizer:` block); ignored",
    ]


def test_model_entry_and_conditional_fields_warn_naming_the_model():
    recipe = load_recipe(
        "merge_method: linear\nmodels:\n- model: org/a\n  weight: 1\n  paramters: {weight: 2}\n"
        "- model: org/b\n  parameters: {weight: [{filter: mlp, value: 1, filtr: x}, {value: 2}]}\n"
    )
    assert recipe.warnings == [
        "recipe: models[0] (org/a): `paramters` is not a model entry field; did you mean "
        "`parameters`? ignored",
        "recipe: models[0] (org/a): `weight` is not a model entry field (an entry has `model` and "
        "`parameters`: put parameters under `parameters:`); ignored",
        "recipe: models[1] (org/b).parameters.weight[0]: `filtr` is not a conditional field; did you "
        "mean `filter`? ignored",
    ]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("merge_method: linear\nmodels: [{model: a}]\ndype: float32\n", "did you mean `dtype`?"),
        ("merge_method: linear\nmodels: [{model: a, weight: 1}]\n", "`weight` is not a model entry field"),
    ],
)
def test_strict_turns_warnings_into_errors(text, fragment):
    with pytest.raises(RecipeError, match="--strict") as e:
        load_recipe(text, strict=True)
    assert fragment in str(e.value)


def test_wrong_values_stay_errors():
    with pytest.raises(RecipeError, match="unknown dtype 'int3'"):
        load_recipe("merge_method: linear\nmodels: [{model: a}]\ndtype: int3\n")
    with pytest.raises(RecipeError, match="vocab_policy"):
        load_recipe("merge_method: linear\nmodels: [{model: a}]\nvocab_policy: grow\n")


def test_parameters_not_taken_warn_and_merge_as_without_them(family, tmp_path):
    base, models = family
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(models[0]), "parameters": {"weight": 0.5, "wieght": 0.3}},
            {"model": str(models[1]), "parameters": {"weight": 0.5, "lambda": 2.0}},
        ],
        "parameters": {"lambda": 1.0, "random_seed": 3},
    }
    plan = weightsmith.plan_merge(recipe)
    m0, m1 = str(models[0]), str(models[1])
    takes = "(its parameters: weight, lambda, normalize, density, rescale, int8_mask)"
    assert plan.warnings == [
        f"parameters.random_seed: `task_arithmetic` takes no parameter `random_seed` {takes}; ignored",
        f"models[0] ({m0}).parameters.wieght: `task_arithmetic` takes no parameter `wieght` {takes}; "
        "did you mean `weight`? ignored",
        f"models[1] ({m1}).parameters.lambda: `lambda` is shared by the whole merge in "
        "`task_arithmetic`, so a per-model value is not used (move it to the top-level "
        "`parameters:`); ignored",
    ]
    weightsmith.merge(recipe, tmp_path / "lenient")
    clean = {**recipe, "parameters": {"lambda": 1.0},
             "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (m0, m1)]}
    weightsmith.merge(clean, tmp_path / "clean")
    a, b = load_folder(tmp_path / "lenient"), load_folder(tmp_path / "clean")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    with pytest.raises(RecipeError, match="takes no parameter `random_seed`"):
        weightsmith.plan_merge(recipe, strict=True)
    with pytest.raises(RecipeError, match="takes no parameter `lambd`.*did you mean `lambda`"):
        weightsmith.plan_merge({**clean, "parameters": {"lambda": 1.0, "lambd": 2}}, strict=True)
    with pytest.raises(RecipeError, match="shared by the whole merge"):
        weightsmith.merge({**recipe, "parameters": {"lambda": 1.0}, "models": [recipe["models"][1]]},
                          tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


def test_number_for_a_boolean_reads_as_mergekit_does(family):
    base, models = family
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(m), "parameters": {"weight": 1, "density": 0.5}} for m in models[:2]],
              "parameters": {"normalize": 1.0}}
    plan = weightsmith.plan_merge(recipe)
    assert all(t.params["normalize"] is True for t in plan.tasks if t.kind == "merge")
    plan = weightsmith.plan_merge({**recipe, "parameters": {"normalize": 0}})
    assert all(t.params["normalize"] is False for t in plan.tasks if t.kind == "merge")
    with pytest.raises(RecipeError, match="must be true or false"):
        weightsmith.plan_merge({**recipe, "parameters": {"normalize": 0.5}})


def test_misspelled_method_gets_did_you_mean(family):
    base, models = family
    with pytest.raises(RecipeError, match="unknown merge_method 'tie'; did you mean `ties`\\? known methods"):
        weightsmith.plan_merge({**linear(models), "merge_method": "tie"})


def test_wise_ft_alpha_outside_unit_interval_warns(family):
    base, models = family
    recipe = {"merge_method": "wise_ft", "base_model": str(base), "models": [str(models[0])],
              "parameters": {"alpha": 1.5}}
    plan = weightsmith.plan_merge(recipe)
    assert len(plan.warnings) == 1 and "alpha 1.5 is outside [0, 1]" in plan.warnings[0]
    assert "extrapolat" in plan.warnings[0]
    assert weightsmith.plan_merge({**recipe, "parameters": {"alpha": 0.3}}).warnings == []


def test_cli_warns_and_strict_refuses(family, tmp_path):
    base, models = family
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**linear(models[:2]), "dype": "float32"}))
    runner = CliRunner()
    res = runner.invoke(main, ["plan", str(path)])
    assert res.exit_code == 0, res.output
    said = f"weightsmith: warning: {path}: `dype` is not a recipe field; did you mean `dtype`? ignored"
    assert said in res.output
    res = runner.invoke(main, ["plan", str(path), "--strict"])
    assert res.exit_code == 2 and "did you mean `dtype`?" in res.output and "--strict" in res.output
    res = runner.invoke(main, ["merge", str(path), str(tmp_path / "out"), "-q", "--strict"])
    assert res.exit_code == 2 and not (tmp_path / "out").exists()
    res = runner.invoke(main, ["merge", str(path), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    assert res.output.count("`dype` is not a recipe field") == 1


def test_method_messages_name_the_model_by_path(family):
    base, models = family
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(m), "parameters": {"weight": 1, "density": d}}
                         for m, d in zip(models[:2], (0.5, 1.5))]}
    with pytest.raises(RecipeError) as e:
        weightsmith.plan_merge(recipe)
    assert f"density of model {str(models[1])!r} for tensor" in str(e.value)
    bad_gamma = {**recipe, "merge_method": "breadcrumbs",
                 "models": [{"model": str(m), "parameters": {"weight": 1, "density": 0.5, "gamma": g}}
                            for m, g in zip(models[:2], (0.01, 1.0))]}
    with pytest.raises(RecipeError) as e:
        weightsmith.plan_merge(bad_gamma)
    assert f"gamma of model {str(models[1])!r}" in str(e.value)
