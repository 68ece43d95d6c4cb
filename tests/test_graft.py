"""Skill grafting: the streamed mask operator, the mask-search math, and a search on a tiny model
end to end through `weightsmith graft`."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner
from models import LLAMA_CONFIG, load_folder, perturb, random_state, save_model
from safetensors.torch import load_file, save_file

import weightsmith
from weightsmith.cli import main
from weightsmith.errors import MergeError, RecipeError
from weightsmith.ops.graft import gamma, random_mask, rounded, score_gradient, top_fraction_mask


@pytest.fixture
def pair(tmp_path):
    pre = random_state(LLAMA_CONFIG, 0)
    ft = perturb(pre, 1, scale=0.02)
    pre_dir = save_model(tmp_path / "pre", pre, LLAMA_CONFIG)
    return pre, ft, pre_dir, save_model(tmp_path / "ft", ft, LLAMA_CONFIG)


def graft_recipe(pre_dir, ft_dir, mask_file):
    return {"merge_method": "graft", "base_model": str(pre_dir), "models": [{"model": str(ft_dir)}],
            "parameters": {"mask": str(mask_file)}}


@pytest.mark.parametrize("fill, expect", [(True, "ft"), (False, "pre")])
def test_constant_masks_give_the_endpoints(tmp_path, pair, fill, expect):
    pre, ft, pre_dir, ft_dir = pair
    mask = {k: torch.full(v.shape, fill, dtype=torch.bool) for k, v in pre.items()}
    save_file(mask, str(tmp_path / "mask.safetensors"))
    weightsmith.merge(graft_recipe(pre_dir, ft_dir, tmp_path / "mask.safetensors"), tmp_path / "out",
                      memory_budget="4KB")  # row blocks: the mask is cut the same way
    want = ft if expect == "ft" else pre
    for k, v in load_folder(tmp_path / "out").items():
        assert torch.equal(v, want[k]), k
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["summary"]["grafted_fraction"] == (1.0 if fill else 0.0)


def test_hand_computed_fractional_mask(tmp_path):
    pre = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    ft = {"w": torch.tensor([[2.0, 0.0], [3.5, 8.0]])}
    pre_dir = save_model(tmp_path / "pre", pre, {"model_type": "x"}, shards=1)
    ft_dir = save_model(tmp_path / "ft", ft, {"model_type": "x"}, shards=1)
    save_file({"w": torch.tensor([[1.0, 0.0], [0.5, 0.25]])}, str(tmp_path / "m.safetensors"))
    weightsmith.merge(graft_recipe(pre_dir, ft_dir, tmp_path / "m.safetensors"), tmp_path / "out")
    assert torch.equal(load_folder(tmp_path / "out")["w"], torch.tensor([[2.0, 2.0], [3.25, 5.0]]))


def test_bad_masks_and_recipes(tmp_path, pair):
    pre, ft, pre_dir, ft_dir = pair
    partial = {k: torch.ones(v.shape, dtype=torch.bool) for k, v in pre.items() if k != "model.norm.weight"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(MergeError, match=r"'model.norm.weight'.*partial.safetensors.*weightsmith graft"):
        weightsmith.merge(graft_recipe(pre_dir, ft_dir, tmp_path / "partial.safetensors"), tmp_path / "o1")
    wrong = {k: torch.ones(3, dtype=torch.bool) for k in pre}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(MergeError, match="shape"):
        weightsmith.plan_merge(graft_recipe(pre_dir, ft_dir, tmp_path / "wrong.safetensors"))
    two = graft_recipe(pre_dir, ft_dir, tmp_path / "partial.safetensors")
    two["models"].append({"model": str(ft_dir)})
    with pytest.raises(RecipeError, match="exactly 1"):
        weightsmith.plan_merge(two)
    no_mask = graft_recipe(pre_dir, ft_dir, "x")
    del no_mask["parameters"]
    with pytest.raises(RecipeError, match="needs `mask`"):
        weightsmith.plan_merge(no_mask)


# --------------------------------------------------------------------------- mask-search math
def test_top_fraction_is_global_and_skips_zeros():
    deltas = {"a": torch.tensor([0.1, -0.5, 0.0]), "b": torch.tensor([[0.3, -0.05], [0.2, 0.0]])}
    mask = top_fraction_mask(deltas, 3 / 7)  # k = 3: 0.5 (in a), 0.3 and 0.2 (in b)
    assert mask["a"].tolist() == [False, True, False]
    assert mask["b"].tolist() == [[True, False], [True, False]]
    everything = top_fraction_mask(deltas, 1.0)
    assert sum(int(m.sum()) for m in everything.values()) == 5  # the two zero deltas stay out
    with pytest.raises(MergeError, match="sparsity"):
        top_fraction_mask(deltas, 0.0)


def test_sigmoid_parametrisation_gradient_matches_autograd():
    torch.manual_seed(0)
    S = torch.rand(50, dtype=torch.float64) * 12  # some past the bias, so both sides are covered
    b = torch.rand(50) < 0.3
    delta = torch.randn(50, dtype=torch.float64)
    pre = torch.randn(50, dtype=torch.float64)
    target = torch.randn(50, dtype=torch.float64)
    S_auto = S.clone().requires_grad_(True)
    theta = pre + gamma(S_auto, b) * delta
    loss = ((theta - target) ** 2).sum()
    loss.backward()
    grad_theta = 2 * (pre + gamma(S, b) * delta - target)
    assert torch.allclose(score_gradient(grad_theta, delta, S, b), S_auto.grad, rtol=1e-12, atol=1e-15)
    # Initially (S in [0, 1)) gamma is ~b, and rounding gives exactly b.
    S0 = torch.rand(50, dtype=torch.float64)
    assert torch.equal(rounded(S0, b), b)
    assert float((gamma(S0, b) - b.double()).abs().max()) < 2e-4


def test_random_mask_has_the_exact_count():
    shapes = {"a": torch.Size([3, 4]), "b": torch.Size([5])}
    mask = random_mask(shapes, 7, torch.Generator().manual_seed(0))
    assert {k: v.shape for k, v in mask.items()} == shapes
    assert sum(int(m.sum()) for m in mask.values()) == 7


# --------------------------------------------------------------------------- search end to end
def _cls_rows(n: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "violin", "tiger", "lamp", "zebra"]
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        text = [rng.choice(words) for _ in range(rng.randint(2, 6))]
        text.insert(rng.randrange(len(text) + 1), "good" if label else "bad")
        rows.append({"text": " ".join(text), "label": label})
    return rows


def test_graft_search_on_a_tiny_model(tmp_path):
    from weightsmith.finetune import Evaluator, finetune
    from weightsmith.testbeds.common import write_jsonl
    from weightsmith.testbeds.tiny import make_tiny_bert

    train = write_jsonl(tmp_path / "train.jsonl", _cls_rows(48, 0))
    val = write_jsonl(tmp_path / "val.jsonl", _cls_rows(32, 1))
    pre = make_tiny_bert(tmp_path / "pre", num_labels=2, seed=0, hidden=16)
    ft = tmp_path / "ft"
    finetune(pre, ft, train, "classification", steps=12, lr=1e-2, batch_size=16, max_length=16,
             quiet=True, freeze=["word_embeddings"])
    val_ev = Evaluator(pre, val, "classification", max_length=16)
    train_ev = Evaluator(pre, train, "classification", max_length=16)
    assert val_ev.score(load_folder(ft)) > val_ev.score() + 0.2  # something worth localising

    out = tmp_path / "grafted"
    res = CliRunner().invoke(main, [
        "graft", str(pre), str(ft), str(out), "--data", str(train), "--val", str(val),
        "--task", "classification", "--sparsity", "0.02", "--steps", "3", "--lr", "auto",
        "--max-length", "16", "--region", r"encoder\.", "--region", r"classifier\.", "--quiet",
    ])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "graft_report.json").read_text())
    history = report["history"]
    assert history[0]["grafted"] == pytest.approx(0.02 * report["region_size"], abs=2)
    # The search moved the mask (lr auto scales the step to the model) ...
    assert any(h["grafted"] != history[0]["grafted"] for h in history[1:])
    # ... and kept the best rounded mask by train + val score, the start included.
    totals = [h["score_0"] + h["score_1"] for h in history]
    assert report["best_score"] == pytest.approx(max(totals))
    assert report["best_step"] == totals.index(max(totals))
    assert report["grafted"] == history[report["best_step"]]["grafted"]
    mask = load_file(str(tmp_path / "grafted.mask.safetensors"))
    assert set(mask) == set(load_folder(pre))  # every floating tensor of the model
    assert all(v.dtype == torch.bool for v in mask.values())
    assert not any(bool(v.any()) for k, v in mask.items() if k.startswith("bert.embeddings."))
    assert sum(int(v.sum()) for v in mask.values()) == report["grafted"]
    # The streamed merge with the saved mask scores what the search scored in memory.
    merged = load_folder(out)
    assert train_ev.score(merged) + val_ev.score(merged) == pytest.approx(report["best_score"])

    res = CliRunner().invoke(main, [
        "graft", str(pre), str(ft), str(tmp_path / "g2"), "--data", str(train), "--task",
        "classification", "--sparsity", "2",
    ])
    assert res.exit_code != 0 and "sparsity 2.0" in res.output
