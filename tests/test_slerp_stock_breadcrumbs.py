"""SLERP, Model Stock and Model Breadcrumbs: hand-computed cases, identities, mergekit semantics."""

import json
import math

import pytest
import torch
from models import load_folder, make_family
from sparse_helpers import kept_band_sorted, merge_to_state, recipe

from weightsmith.errors import RecipeError
from weightsmith.ops import MergeInputs, get_method
from weightsmith.pipeline import merge, plan_merge


def run(method, models, base, **params):
    stacked = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in models])
    inputs = MergeInputs("t", stacked, torch.as_tensor(base, dtype=torch.float32))
    return get_method(method)(inputs, **params), inputs.stats


# --------------------------------------------------------------------------- slerp
def test_slerp_hand_computed():
    out, stats = run("slerp", [[0.0, 1.0]], [1.0, 0.0], t=0.5)
    h = math.sqrt(0.5)
    torch.testing.assert_close(out, torch.tensor([h, h]))
    # a quarter of the way along a 90 degree arc between vectors of norms 2 and 1
    out, _ = run("slerp", [[0.0, 1.0]], [2.0, 0.0], t=0.25)
    c0, c1 = math.sin(0.75 * math.pi / 2), math.sin(0.25 * math.pi / 2)
    torch.testing.assert_close(out, torch.tensor([2 * c0, c1]))
    assert stats["lerp_fallback"] == 0


def test_slerp_colinear_falls_back_to_lerp():
    v0 = torch.tensor([1.0, 2.0, 3.0])
    out, stats = run("slerp", [2 * v0], v0, t=0.25)
    assert torch.equal(out, 0.75 * v0 + 0.25 * (2 * v0))
    assert stats["lerp_fallback"] == 1
    out, stats = run("slerp", [-v0], v0, t=0.5)  # antipodal: lerp too
    assert torch.equal(out, torch.zeros(3)) and stats["lerp_fallback"] == 1


def test_slerp_endpoints_are_bit_exact_and_gradients_apply(family, tmp_path):
    base, models = family
    b, m = load_folder(base), load_folder(models[0])
    # mergekit's form: the base listed among the models too
    rec = {"merge_method": "slerp", "base_model": str(base),
           "models": [{"model": str(base)}, {"model": str(models[0])}]}
    for t, want in ((0.0, b), (1.0, m)):
        out = merge_to_state({**rec, "parameters": {"t": t}}, tmp_path / f"t{t}")
        for k in want:
            assert torch.equal(out[k], want[k]), (t, k)
    out = merge_to_state({**rec, "parameters": {"t": [0.0, 1.0]}}, tmp_path / "grad")
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], m["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])  # outside the stack: t = 0
    mid = out["model.layers.1.mlp.up_proj.weight"]
    assert not torch.equal(mid, b["model.layers.1.mlp.up_proj.weight"])
    # filters
    filt = {"t": [{"filter": "self_attn", "value": 1.0}, {"value": 0.0}]}
    out = merge_to_state({**rec, "parameters": filt}, tmp_path / "filt")
    q, up = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(out[q], m[q])
    assert torch.equal(out[up], b[up])


def test_slerp_needs_exactly_two_models(family):
    base, models = family
    with pytest.raises(RecipeError, match="exactly 1 model"):
        plan_merge(recipe("slerp", base, models[:2], {"t": 0.5}))
    with pytest.raises(RecipeError, match="base_model"):
        plan_merge({"merge_method": "slerp", "models": [{"model": str(m)} for m in models[:2]],
                    "parameters": {"t": 0.5}})
    with pytest.raises(RecipeError, match="needs `t`"):
        plan_merge(recipe("slerp", base, models[:1]))


# --------------------------------------------------------------------------- model stock
def test_model_stock_hand_computed():
    base = [1.0, 1.0]
    # offsets (1, 0) and (1, 1): cos = 1/sqrt(2); N = 2 -> t = 2c / (1 + c)
    out, stats = run("model_stock", [[2.0, 1.0], [2.0, 2.0]], base)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    torch.testing.assert_close(out, torch.tensor([t * 2.0 + (1 - t), t * 1.5 + (1 - t)]))
    assert stats["t_count"] == 1
    # opposite offsets: 1 + (N - 1) cos = 0, singular -> keep the base
    out, stats = run("model_stock", [[2.0, 1.0], [0.0, 1.0]], base)
    assert torch.equal(out, torch.tensor(base)) and stats["singular"] == 1


def test_model_stock_filter_wise_is_per_row():
    base = torch.zeros(2, 2)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # row 0 same direction, row 1 opposite
    out, stats = run("model_stock", [a, b], base, filter_wise=True)
    # row 0: cos 1 -> t = 2/2 = 1 -> mean; row 1: singular -> base
    assert torch.equal(out, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert stats["t_count"] == 2 and stats["singular"] == 1
    whole, _ = run("model_stock", [a, b], base)  # whole tensor: cos 0 -> t 0 -> base
    assert torch.equal(whole, base)


def test_model_stock_identical_fine_tunes_give_that_model(family, tmp_path):
    base, models = family
    out = merge_to_state(recipe("model_stock", base, [models[0], models[0]]), tmp_path / "o")
    for k, v in load_folder(models[0]).items():
        # cos = 1 -> t = 1 -> the mean of identical models, exact
        assert torch.equal(out[k], v), k


def test_model_stock_needs_two_fine_tunes(family):
    base, models = family
    with pytest.raises(RecipeError, match="at least 2"):
        plan_merge(recipe("model_stock", base, models[:1]))


# --------------------------------------------------------------------------- breadcrumbs
def test_breadcrumbs_hand_computed_band():
    tau = torch.tensor([0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 0.6, -0.4, 0.8, 1.0])
    # n = 10, density 0.5 -> keep 5, gamma 0.2 -> drop the top 2 (1.0, -0.9): keep the next 5
    out, stats = run("breadcrumbs", [tau], torch.zeros(10), weight=[1.0], density=[0.5], gamma=[0.2])
    want = torch.tensor([0.0, 0.0, 0.5, 0.0, -0.7, 0.0, 0.6, -0.4, 0.8, 0.0])
    assert torch.equal(out, want) and stats["kept[0]"] == 5
    # density + gamma > 1: fewer outliers removed so that floor(density n) stay (mergekit)
    out, _ = run("breadcrumbs", [tau], torch.zeros(10), weight=[1.0], density=[0.9], gamma=[0.3])
    assert torch.equal(out, torch.where(tau.abs() == 1.0, 0.0, tau))
    # density 1: gamma ignored, as mergekit
    out, _ = run("breadcrumbs", [tau], torch.zeros(10), weight=[1.0], density=[1.0], gamma=[0.3])
    assert torch.equal(out, tau)


def test_breadcrumbs_keeps_ties_with_the_band_edges():
    args = dict(weight=[1.0], density=[0.5], gamma=[1 / 6 + 1e-9])  # n = 6: keep 3, drop top 1
    # ascending 0.1, 0.3, 0.3, 0.3, 0.8, 1.0: mergekit keeps positions 2..4 (0.3, 0.3, 0.8);
    # the 0.3 at position 1 ties with a kept one, so it is kept too
    tau = torch.tensor([0.1, 0.3, 0.3, 0.3, 0.8, 1.0])
    out, _ = run("breadcrumbs", [tau], torch.zeros(6), **args)
    assert torch.equal(out, torch.tensor([0.0, 0.3, 0.3, 0.3, 0.8, 0.0]))
    # ascending 0.05, 0.1, 0.2, 0.3, 0.9, 0.9: the 0.9 "outlier" ties with a kept 0.9
    tau = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.9, 0.05])
    out, _ = run("breadcrumbs", [tau], torch.zeros(6), **args)
    assert torch.equal(out, torch.tensor([0.0, 0.2, 0.3, 0.9, 0.9, 0.0]))


def test_breadcrumbs_rows_hand_computed():
    tau = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [-5.0, 4.0, -3.0, 2.0, -1.0]])
    # per row d = 5: remove floor(0.2*5) = 1 largest, keep the next floor(0.4*5) = 2
    out, _ = run("breadcrumbs", [tau], torch.zeros(2, 5), weight=[1.0], density=[0.4], gamma=[0.2],
                 scope="row")
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 3.0, 4.0, 0.0], [0.0, 4.0, -3.0, 0.0, 0.0]]))
    # per tensor the band is global: top 2 of 10 removed (5, -5), next 4 kept (4, 4, 3, -3)
    out, _ = run("breadcrumbs", [tau], torch.zeros(2, 5), weight=[1.0], density=[0.4], gamma=[0.2])
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 3.0, 4.0, 0.0], [0.0, 4.0, -3.0, 0.0, 0.0]]))


def test_breadcrumbs_equals_mergekit_semantics_without_ties(tmp_path):
    base, models = make_family(tmp_path / "in", 2, dtype=torch.float32)
    params = [{"density": 0.4, "gamma": 0.05, "weight": 0.7}, {"density": 0.6, "gamma": 0.01, "weight": 1.2}]
    out = merge_to_state(recipe("breadcrumbs", base, models, {"lambda": 0.5}, params), tmp_path / "o")
    b, fts = load_folder(base), [load_folder(m) for m in models]
    for k in out:
        want = b[k].clone()
        for f, p in zip(fts, params):
            tau = f[k] - b[k]
            want += 0.5 * p["weight"] * tau * kept_band_sorted(tau, p["density"], p["gamma"])
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-7)


def test_breadcrumbs_ties_elects_signs(family, tmp_path):
    base, models = family
    out = merge(recipe("breadcrumbs_ties", base, models, {"density": 0.5, "gamma": 0.02}),
                tmp_path / "o")
    report = json.loads((out.out / "merge_report.json").read_text())["summary"]
    assert "elected_positive_fraction" in report
    for row in report["models"]:
        assert 0.45 < row["kept_density"] <= 0.55


@pytest.mark.parametrize(
    "params, match",
    [
        ({"gamma": 1.0}, r"must be in \[0, 1\)"),
        ({"gamma": -0.1}, r"must be in \[0, 1\)"),
        ({"density": 0}, r"must be in \(0, 1\]"),
        ({"scope": "column"}, "tensor | row"),
    ],
)
def test_breadcrumbs_bad_parameters(family, params, match):
    base, models = family
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        with pytest.raises(RecipeError, match=match):
            plan_merge(recipe(method, base, models, params))
