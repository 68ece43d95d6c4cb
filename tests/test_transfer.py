"""Fine-tuning transfer (merge_method: transfer, `weightsmith transfer`): identities, float64
arithmetic, vocabulary growth, an independent reference, errors, and the CLI workflow."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from models import LLAMA_CONFIG, load_folder, perturb, random_state, save_model

import weightsmith
from weightsmith.cli import main
from weightsmith.errors import MergeError, RecipeError


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    mag = x.abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def reference_transfer(
    new: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], old: dict[str, torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """In memory, as the reference script: pad both bases with zero rows up to the fine-tune's
    row count, diff in float64, add to the new base."""
    def padded(t: torch.Tensor, rows: int) -> torch.Tensor:
        t = t.double()
        if t.shape[0] != rows:
            t = torch.cat([t, torch.zeros(rows - t.shape[0], *t.shape[1:], dtype=t.dtype)])
        return t

    out = {}
    for key, f in ft.items():
        rows = f.shape[0] if f.dim() else 0
        base_new = padded(new[key], rows) if f.dim() else new[key].double()
        base_old = padded(old[key], rows) if f.dim() else old[key].double()
        out[key] = base_new + weight * (f.double() - base_old)
    return out


@pytest.fixture
def versions(tmp_path):
    """old base, its fine-tune, and a new base version (a continued old base), bf16."""
    old = random_state(LLAMA_CONFIG, 1)
    new = perturb(old, 2, scale=0.02)
    ft = perturb(old, 3, scale=0.01)
    dirs = {
        name: save_model(tmp_path / name, state, LLAMA_CONFIG)
        for name, state in (("old", old), ("new", new), ("ft", ft))
    }
    return {"old": old, "new": new, "ft": ft}, dirs


def recipe(dirs, weight=1.0, **extra):
    return {
        "merge_method": "transfer",
        "base_model": str(dirs["new"]),
        "models": [
            {"model": str(dirs["ft"]), "parameters": {"source_base": str(dirs["old"]), "weight": weight}}
        ],
        **extra,
    }


def test_weight_zero_gives_the_new_base(tmp_path, versions):
    states, dirs = versions
    plan = weightsmith.plan_merge(recipe(dirs, 0.0))
    assert plan.compute_dtype == torch.float64
    weightsmith.merge(recipe(dirs, 0.0), tmp_path / "out")
    for k, v in load_folder(tmp_path / "out").items():
        assert torch.equal(v, states["new"][k]), k


def test_same_base_weight_one_gives_the_finetune(tmp_path, versions):
    states, dirs = versions
    r = recipe(dirs)
    r["base_model"] = str(dirs["old"])  # transferring onto the base it came from
    weightsmith.merge(r, tmp_path / "out")
    for k, v in load_folder(tmp_path / "out").items():
        assert torch.equal(v, states["ft"][k]), k


@pytest.mark.parametrize("weight", [1.0, 0.5, -0.75])
def test_matches_independent_reference_within_one_bf16_step(tmp_path, versions, weight):
    states, dirs = versions
    weightsmith.merge(recipe(dirs, weight), tmp_path / "out")
    ref = reference_transfer(states["new"], states["ft"], states["old"], weight)
    out = load_folder(tmp_path / "out")
    assert set(out) == set(ref)
    for k, v in out.items():
        err = (v.double() - ref[k]).abs()
        assert bool((err <= bf16_ulp(ref[k])).all()), (k, float(err.max()))


def test_hand_computed_float64_diff(tmp_path):
    # Values whose float32 difference would round: 1 + 2^-30 - 1 is exact only in float64.
    shape = (4, 4)
    old = {"model.layers.0.w.weight": torch.full(shape, 1.0, dtype=torch.float64)}
    ft = {"model.layers.0.w.weight": torch.full(shape, 1.0 + 2.0**-30, dtype=torch.float64)}
    new = {"model.layers.0.w.weight": torch.full(shape, 2.0**-29, dtype=torch.float64)}
    dirs = {n: save_model(tmp_path / n, s, {"model_type": "x"}, shards=1) for n, s in
            (("old", old), ("ft", ft), ("new", new))}
    weightsmith.merge(recipe(dirs, 2.0), tmp_path / "out")
    out = load_folder(tmp_path / "out")["model.layers.0.w.weight"]
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.full(shape, 2.0**-29 + 2 * 2.0**-30, dtype=torch.float64))


def test_several_finetunes_from_different_sources(tmp_path, versions):
    states, dirs = versions
    other_old = perturb(states["old"], 7, scale=0.02)
    other_ft = perturb(other_old, 8, scale=0.01)
    dirs["old2"] = save_model(tmp_path / "old2", other_old, LLAMA_CONFIG)
    dirs["ft2"] = save_model(tmp_path / "ft2", other_ft, LLAMA_CONFIG)
    r = recipe(dirs, 0.5)
    second = {"source_base": str(dirs["old2"]), "weight": 0.25}
    r["models"].append({"model": str(dirs["ft2"]), "parameters": second})
    weightsmith.merge(r, tmp_path / "out")
    out = load_folder(tmp_path / "out")
    for k, v in out.items():
        expected = (
            states["new"][k].double()
            + 0.5 * (states["ft"][k].double() - states["old"][k].double())
            + 0.25 * (other_ft[k].double() - other_old[k].double())
        )
        assert bool(((v.double() - expected).abs() <= bf16_ulp(expected)).all()), k


def test_vocabulary_growth_pads_with_zero_rows(tmp_path, versions):
    states, dirs = versions
    grown_cfg = {**LLAMA_CONFIG, "vocab_size": LLAMA_CONFIG["vocab_size"] + 8}
    ft = dict(states["ft"])
    g = torch.Generator().manual_seed(9)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = (0.05 * torch.randn(8, ft[key].shape[1], generator=g)).to(torch.bfloat16)
        ft[key] = torch.cat([ft[key], extra])
    dirs["ft"] = save_model(tmp_path / "ft_grown", ft, grown_cfg)
    with pytest.raises(MergeError, match="vocab_policy: pad"):
        weightsmith.plan_merge(recipe(dirs))
    weightsmith.merge(recipe(dirs, vocab_policy="pad"), tmp_path / "out")
    out = load_folder(tmp_path / "out")
    ref = reference_transfer(states["new"], ft, states["old"], 1.0)
    for k, v in out.items():
        assert v.shape == ref[k].shape, k
        assert bool(((v.double() - ref[k]).abs() <= bf16_ulp(ref[k])).all()), k
    # The new tokens' rows are the fine-tune's own (both bases read as zeros there).
    assert torch.equal(out["lm_head.weight"][-8:], ft["lm_head.weight"][-8:])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == grown_cfg["vocab_size"]


def test_errors_name_the_problem(tmp_path, versions):
    states, dirs = versions
    r = recipe(dirs)
    del r["models"][0]["parameters"]["source_base"]
    with pytest.raises(RecipeError, match="needs `source_base`"):
        weightsmith.plan_merge(r)
    partial = {k: v for k, v in states["old"].items() if k != "model.norm.weight"}
    dirs["old"] = save_model(tmp_path / "old_partial", partial, LLAMA_CONFIG)
    with pytest.raises(MergeError, match=r"'model.norm.weight'.*source_base .*old_partial"):
        weightsmith.merge(recipe(dirs), tmp_path / "out")
    wrong = dict(states["old"])
    wrong["model.norm.weight"] = torch.ones(7, dtype=torch.bfloat16)
    dirs["old"] = save_model(tmp_path / "old_wrong", wrong, LLAMA_CONFIG)
    with pytest.raises(MergeError, match="source_base.*shape"):
        weightsmith.plan_merge(recipe(dirs))


def test_cli_transfer_matches_the_library(tmp_path, versions):
    states, dirs = versions
    res = CliRunner().invoke(
        main, ["transfer", str(dirs["new"]), str(dirs["ft"]), str(dirs["old"]), str(tmp_path / "cli"),
               "--weight", "0.5"],
    )
    assert res.exit_code == 0, res.output
    weightsmith.merge(recipe(dirs, 0.5, vocab_policy="pad"), tmp_path / "lib")
    a, b = load_folder(tmp_path / "cli"), load_folder(tmp_path / "lib")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = CliRunner().invoke(
        main, ["transfer", str(dirs["new"]), str(dirs["ft"]), str(dirs["old"]), str(tmp_path / "x"),
               "--then-finetune"],
    )
    assert res.exit_code != 0 and "--data and --task" in res.output


def test_cli_recycling_then_finetuning(tmp_path):
    from weightsmith.testbeds import seq_tasks as st
    from weightsmith.testbeds.common import write_jsonl
    from weightsmith.testbeds.tiny import make_tiny_llama

    old = make_tiny_llama(tmp_path / "old", seed=0)
    new = make_tiny_llama(tmp_path / "new", seed=1)
    ft = make_tiny_llama(tmp_path / "ft", seed=2)
    data = write_jsonl(tmp_path / "train.jsonl", st.sample(st.reverse, 16, seed=3))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        main,
        ["transfer", str(new), str(ft), str(old), str(out), "--then-finetune", "--data", str(data),
         "--task", "causal-lm", "--steps", "2", "--batch-size", "8", "--lr", "1e-3", "--quiet"],
    )
    assert res.exit_code == 0, res.output
    log = json.loads((out / "finetuned" / "train_log.json").read_text())
    assert log["init_from"]["loaded"] == len(load_folder(out / "transferred"))
    assert log["base"] == str(new)
    transferred = load_folder(out / "transferred")
    tuned = load_folder(out / "finetuned")
    key = "model.layers.0.mlp.up_proj.weight"
    # Training started from the transfer (not from NEW_BASE) and then moved away from it.
    assert not torch.equal(tuned[key], transferred[key])
    assert (tuned[key] - transferred[key]).abs().max() < 0.05
