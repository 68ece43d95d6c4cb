"""dtype names in one place (weightsmith/dtype_names.py): every spelling accepted before it
existed still parses to the same dtype, wherever a dtype is named (recipe, lazy API,
extract-lora), and a dtype is written under one name."""

from __future__ import annotations

import pytest
import torch

from weightsmith.dtype_names import ALIASES, FACTOR_DTYPES, NAMES, dtype_name, parse_dtype
from weightsmith.errors import RecipeError

# recipe.DTYPE_ALIASES as it was, before this module: each must keep parsing the same.
BEFORE = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}


@pytest.mark.parametrize("alias", sorted(BEFORE))
def test_every_recipe_alias_is_kept(alias):
    from weightsmith.recipe import load_recipe

    assert parse_dtype(alias, "x") == parse_dtype(alias.upper(), "x") == BEFORE[alias]
    models = [{"model": "org/a", "parameters": {"weight": 1}}]
    recipe = load_recipe({"merge_method": "linear", "models": models, "dtype": alias,
                          "out_dtype": alias.upper()})
    assert recipe.dtype == recipe.out_dtype == BEFORE[alias]


def test_tables_agree_with_torch():
    assert set(ALIASES) == set(BEFORE)
    assert all(dtype_name(getattr(torch, n)) == n for n in NAMES)
    assert set(FACTOR_DTYPES) <= set(NAMES)
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(torch.int64) == "int64"


def test_refusals_name_the_field_and_the_choices():
    with pytest.raises(RecipeError, match=r"out_dtype: unknown dtype 'int3'; use one of float32, float16"):
        parse_dtype("int3", "out_dtype")
    with pytest.raises(RecipeError, match="unknown dtype 7"):
        parse_dtype(7, "dtype")
    with pytest.raises(RecipeError, match=r"--dtype: 'fp64' is not offered here; use one of bfloat16, "):
        parse_dtype("fp64", "--dtype", FACTOR_DTYPES)


def test_extract_lora_takes_the_aliases_and_refuses_others_before_any_work(tmp_path):
    from weightsmith.lora_extraction import extract_lora

    # Refused before the (missing) checkpoints are opened: the dtype is checked first.
    with pytest.raises(RecipeError, match="extract-lora: --dtype: 'double' is not offered here"):
        extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "out", rank=2, dtype="double")
    with pytest.raises(Exception, match="no such file or folder"):  # `bf16` passes the check
        extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "out", rank=2, dtype="bf16")


def test_extract_lora_cli_offers_the_factor_dtypes():
    import click

    from weightsmith.commands.extract_lora import extract_lora_cmd

    option = next(p for p in extract_lora_cmd.params if p.name == "dtype")
    assert isinstance(option.type, click.Choice) and tuple(option.type.choices) == FACTOR_DTYPES


def test_lazy_api_out_dtype_takes_an_alias(family):
    import weightsmith as ws

    base, models = family
    ft, b = ws.Checkpoint.open(models[0]), ws.Checkpoint.open(base)
    plan = (b + 0.5 * (ft - b)).plan(out_dtype="fp16")
    assert {t.out_dtype for t in plan.tasks if t.out_dtype.is_floating_point} == {torch.float16}
