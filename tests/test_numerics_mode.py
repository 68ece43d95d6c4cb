"""``numerics: mergekit`` plumbing: recipe field, API and CLI option, registry variants, and the
exactly-k selection. Bit parity with mergekit's output is tests/test_parity_numerics.py."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from models import load_folder

import weightsmith
from weightsmith.cli import main
from weightsmith.errors import RecipeError
from weightsmith.ops.mergekit_numerics.task_vectors import keep_band, keep_top_k
from weightsmith.ops.registry import get_method, methods
from weightsmith.recipe import load_recipe

BOTH_TOOLS = (
    "linear task_arithmetic ties breadcrumbs breadcrumbs_ties slerp nuslerp multislerp karcher "
    "model_stock sce nearswap ram ramplus_tl arcee_fusion passthrough"
).split()


def recipe_dict(base, models, **extra):
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in models],
        "dtype": "bfloat16",
        **extra,
    }


def test_recipe_numerics_sets_the_compute_dtype() -> None:
    raw = {"merge_method": "linear", "models": [{"model": "a"}], "dtype": "bfloat16"}
    assert load_recipe(raw).numerics == "weightsmith"
    assert load_recipe(raw).compute_dtype == torch.float32
    mk = load_recipe({**raw, "numerics": "mergekit"})
    assert mk.numerics == "mergekit" and mk.compute_dtype == torch.bfloat16
    assert load_recipe({**raw, "dtype": "float16", "numerics": "mergekit"}).compute_dtype == torch.float16
    # No dtype: float32 (weightsmith has no per-input compute dtype); float8 is storage only.
    no_dtype = {"merge_method": "linear", "models": [{"model": "a"}], "numerics": "mergekit"}
    assert load_recipe(no_dtype).compute_dtype == torch.float32
    fp8 = {**raw, "numerics": "mergekit", "dtype": "float8_e4m3fn"}
    assert load_recipe(fp8).compute_dtype == torch.float32


def test_unknown_numerics_is_refused() -> None:
    with pytest.raises(RecipeError, match="numerics"):
        load_recipe({"merge_method": "linear", "models": [{"model": "a"}], "numerics": "fast"})


def test_every_method_both_tools_have_has_a_mergekit_variant_or_runs_unchanged() -> None:
    for name in BOTH_TOOLS:
        method = get_method(name)
        variant = method.for_numerics("mergekit")
        if name == "passthrough":  # x * scale in the compute dtype is already mergekit's
            assert variant is method
        else:
            assert variant.fn is not method.fn, name
            assert variant.name == name and variant.params == method.params
    # Methods without a variant run unchanged, and the default mode is the method itself.
    assert all(m.for_numerics("weightsmith") is m for m in methods().values())


def test_keep_top_k_keeps_exactly_k_among_ties() -> None:
    delta = torch.tensor([0.5, -0.5, 0.5, 0.1, -0.5, 0.2], dtype=torch.bfloat16)
    kept = keep_top_k(delta, 0.5)  # k = 3 of four entries tied at |0.5|
    assert int((kept != 0).sum()) == 3
    assert set(kept[kept != 0].abs().tolist()) == {0.5}
    # Which three: the first three of torch's descending argsort of the float32 magnitudes.
    order = torch.argsort(delta.abs().float(), descending=True)[:3]
    assert torch.equal(kept != 0, torch.zeros(6, dtype=torch.bool).index_fill_(0, order, True))


def test_keep_band_keeps_exactly_the_target_count() -> None:
    delta = torch.linspace(-1, 1, 100).to(torch.bfloat16)
    kept = keep_band(delta, 0.3, 0.1)  # 30 kept after dropping the 10 largest
    assert int((kept != 0).sum()) == 30
    assert float(kept.abs().max()) < float(delta.abs().sort().values[-10])


def test_api_and_recipe_option_give_the_same_bf16_merge(family, tmp_path) -> None:
    base, models = family
    by_api = weightsmith.merge(recipe_dict(base, models), tmp_path / "api", fsync=False, numerics="mergekit")
    by_recipe = weightsmith.merge(
        recipe_dict(base, models, numerics="mergekit"), tmp_path / "rec", fsync=False
    )
    default = weightsmith.merge(recipe_dict(base, models), tmp_path / "default", fsync=False)
    a, b, c = (load_folder(r.out) for r in (by_api, by_recipe, default))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.dtype == torch.bfloat16 for t in a.values())
    # Exactly k kept versus every tie kept, bf16 versus float32 arithmetic: not the same bits.
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert by_api.plan.compute_dtype == torch.bfloat16 and default.plan.compute_dtype == torch.float32


def test_plan_cli_reports_numerics(family, tmp_path) -> None:
    base, models = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(recipe_dict(base, models)))
    runner = CliRunner()
    out = runner.invoke(main, ["plan", str(recipe), "--json", "--numerics", "mergekit"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)["summary"]
    assert summary["numerics"] == "mergekit" and summary["compute_dtype"] == "bfloat16"
    plain = json.loads(runner.invoke(main, ["plan", str(recipe), "--json"]).output)["summary"]
    assert plain["numerics"] == "weightsmith" and plain["compute_dtype"] == "float32"
    bad = runner.invoke(main, ["plan", str(recipe), "--numerics", "fast"])
    assert bad.exit_code != 0


def test_scope_model_has_no_mergekit_counterpart(family, tmp_path) -> None:
    base, models = family
    raw = recipe_dict(base, models, parameters={"scope": "row"}, numerics="mergekit")
    raw["merge_method"] = "breadcrumbs"
    for m in raw["models"]:
        m["parameters"]["gamma"] = 0.01
    with pytest.raises(RecipeError, match="scope"):
        weightsmith.merge(raw, tmp_path / "out", fsync=False)
