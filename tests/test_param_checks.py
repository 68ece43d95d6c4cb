"""ops/param_checks.py: one "fraction in [0, 1]" check, one message format for every method."""

from __future__ import annotations

import math
import re

import pytest
import torch

from weightsmith.errors import RecipeError
from weightsmith.ops.param_checks import check_density, check_fraction
from weightsmith.ops.registry import TensorSpec, get_method


def spec(**params: object) -> TensorSpec:
    return TensorSpec("w", (4, 4), dict(params), models=("a", "b"))


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, True, "0.5"])
def test_a_shared_fraction_out_of_range_names_parameter_value_range_and_fix(value) -> None:
    with pytest.raises(RecipeError) as e:
        check_fraction([spec(share=value)], "share", "m", meaning="the share kept")
    assert str(e.value) == (
        f"m: share for tensor 'w' is {value!r}; it is the share kept and must be in [0, 1]: "
        "set parameters.share to a value in [0, 1]"
    )


def test_a_per_model_fraction_names_the_model() -> None:
    with pytest.raises(RecipeError) as e:
        check_fraction([spec(share=[0.5, 2.0])], "share", "m", meaning="the share kept")
    assert str(e.value).startswith("m: share of model 'b' for tensor 'w' is 2.0;")
    assert "set that model's `share` (or parameters.share) to a value in [0, 1]" in str(e.value)


@pytest.mark.parametrize("low_open,high_open,interval,inside,outside", [
    (False, False, "[0, 1]", [0.0, 1.0, 0.3], [-1e-9, 1.0000001]),
    (True, False, "(0, 1]", [1e-9, 1.0], [0.0]),
    (False, True, "[0, 1)", [0.0, 0.999], [1.0]),
])
def test_open_ends(low_open, high_open, interval, inside, outside) -> None:
    kw = {"meaning": "x", "low_open": low_open, "high_open": high_open}
    check_fraction([spec(f=v) for v in inside], "f", "m", **kw)  # no error
    for v in outside:
        with pytest.raises(RecipeError, match=re.escape(f"must be in {interval}")):
            check_fraction([spec(f=v)], "f", "m", **kw)


def test_a_spec_without_the_parameter_takes_the_default() -> None:
    check_fraction([spec()], "f", "m", meaning="x")  # no error: the method's default is in range


def test_density_keeps_its_message() -> None:
    with pytest.raises(RecipeError) as e:
        check_density([spec(density=[1.0, 0.0])], "ties")
    assert str(e.value).startswith(
        "ties: density of model 'b' for tensor 'w' is 0.0; it is the fraction of each task vector kept "
        "and must be in (0, 1]"
    )


@pytest.mark.parametrize("method,name,bad,interval", [
    ("iso_cts", "common_space_fraction", -0.1, "[0, 1]"),
    ("tsv", "rank_fraction", 1.5, "[0, 1]"),
])
def test_spectral_methods_use_the_shared_check(method, name, bad, interval) -> None:
    prepare = get_method(method).prepare
    assert prepare is not None
    prepare([spec(**{name: 0.5})], torch.float32)  # in range: no error
    with pytest.raises(RecipeError) as e:
        prepare([spec(**{name: bad})], torch.float32)
    assert str(e.value).startswith(f"{method}: {name} for tensor 'w' is {bad};")
    assert f"set parameters.{name} to a value in {interval}" in str(e.value)
