"""`weightsmith plan` (issue 15): a summary and one line per distinct parameter setting by
default, every tensor with --verbose, rounded numbers, no parameters the method ignores."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from click.testing import CliRunner

from weightsmith.cli import main
from weightsmith.plan_report import describe_tensors, layer_ranges, number

LONG_FLOAT = re.compile(r"\d\.\d{7,}")


@pytest.fixture
def recipe(family, tmp_path):
    base, models = family
    r = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(models[0]), "parameters": {"weight": [0.1, 0.7]}},  # 0.1 -> 0.4 -> 0.7
            {"model": str(models[1]), "parameters": {"weight": 0.3}},
        ],
        "parameters": {"lambda": 0.6, "density": 0.5},  # density: accepted, ignored by task_arithmetic
        "dtype": "float32",
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def plan(*args: str) -> str:
    res = CliRunner().invoke(main, ["plan", *args])
    assert res.exit_code == 0, res.output
    return res.output


def test_default_output_is_one_line_per_setting_with_rounded_numbers(recipe):
    # The exact values carry float artifacts (0.39999999999999997): --json keeps them ...
    exact = json.loads(plan(str(recipe), "--json"))
    weights = {tuple(t["params"]["weight"]) for t in exact["tensors"]}
    assert any(LONG_FLOAT.search(repr(w)) for w in weights), weights
    # ... the text a person reads rounds them, and groups the 30 tensors by setting.
    text = plan(str(recipe), "--memory-budget", "8KB")
    assert not LONG_FLOAT.search(text), text
    settings = [line for line in text.splitlines() if line.startswith("task_arithmetic(")]
    assert len(settings) == len(weights) == 3
    head = "task_arithmetic(weight=[0.4, 0.3], lambda=0.6, normalize=false): 9 tensors"
    assert settings[1].startswith(head)
    assert "layer 1 (9 tensors)" in settings[1] and "in row blocks" in settings[1]
    assert "layer 0 (9 tensors)" in settings[0] and "lm_head.weight" in settings[0]
    assert "density" not in text  # ignored by the method: not shown
    assert "tensors:         30 (30 merged, 0 copied)" in text and "bytes to read" in text
    assert len(text.splitlines()) < 15  # not one line per tensor


def test_verbose_lists_every_tensor_rounded(recipe):
    text = plan(str(recipe), "--verbose", "--memory-budget", "8KB")
    lines = [line for line in text.splitlines() if " <- task_arithmetic(" in line]
    assert len(lines) == 30
    assert "model.layers.1.mlp.up_proj.weight [48, 32] float32 <- task_arithmetic(2 models, base) t=0.5 " \
           "weight=[0.4, 0.3], lambda=0.6, normalize=false in " in text
    assert not LONG_FLOAT.search(text) and "density" not in text


def test_helpers_round_and_group():
    assert number(0.6000000000000001) == "0.6" and number([1.0, 0.39999999999999997]) == "[1, 0.4]"
    assert number(True) == "true" and number(12345678.9) == "1.23457e+07"
    assert layer_ranges([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8" and layer_ranges([3]) == "3"
    names = [f"encoder.layer.{i}.{p}" for i in range(4) for p in ("a.weight", "b.weight")]
    assert describe_tensors([*names, "embeddings.x", "embeddings.y", "pooler.w"]) == (
        "layers 0-3 (2 each); embeddings.* (2); pooler.w"
    )
