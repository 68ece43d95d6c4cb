"""BANG: the head-scaling operator against WiSE-FT, and the fine-tune-then-average command."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from models import load_folder
from safetensors.torch import load_file
from sparse_helpers import merge_to_state, recipe

from weightsmith.cli import main
from weightsmith.commands.bang import bang_recipe, run_bang
from weightsmith.errors import RecipeError
from weightsmith.pipeline import plan_merge


def test_temperature_one_is_wise_ft_bit_for_bit(family, tmp_path: Path) -> None:
    base, models = family
    wise = merge_to_state(recipe("wise_ft", base, models[:1], {"alpha": 0.3}), tmp_path / "w")
    bang = merge_to_state(recipe("bang", base, models[:1], {"alpha": 0.3}), tmp_path / "b")
    assert all(torch.equal(wise[k], bang[k]) for k in wise)


def test_temperature_divides_only_the_head(family, tmp_path: Path) -> None:
    base, models = family
    params = {"alpha": 0.5, "temperature": 4.0, "head": r"^lm_head\.weight$"}
    out = merge_to_state(recipe("bang", base, models[:1], params, dtype="float32", out_dtype="float32"),
                         tmp_path / "b")
    b, f = load_folder(base), load_folder(models[0])
    for k in out:
        ft = f[k].float() / 4.0 if k == "lm_head.weight" else f[k].float()
        expected = 0.5 * b[k].float() + 0.5 * ft
        assert torch.equal(out[k], expected), k
    summary = json.loads((tmp_path / "b" / "merge_report.json").read_text())["summary"]
    assert summary["head_tensors_scaled"] == 1


def test_bang_config_errors(family) -> None:
    base, models = family
    with pytest.raises(RecipeError, match="no tensor matches the head pattern"):
        plan_merge(recipe("bang", base, models[:1], {"temperature": 2.0, "head": "classifier"}))
    with pytest.raises(RecipeError, match="must be > 0"):
        plan_merge(recipe("bang", base, models[:1], {"temperature": 0.0}))
    with pytest.raises(RecipeError, match="valid regular expression"):
        plan_merge(recipe("bang", base, models[:1], {"head": "(("}))
    with pytest.raises(RecipeError, match="exactly 1"):
        plan_merge(recipe("bang", base, models[:2], {}))


def test_recipe_picks_wise_ft_unless_the_head_is_scaled() -> None:
    assert bang_recipe("b", "f", 0.5)["merge_method"] == "wise_ft"
    scaled = bang_recipe("b", "f", 0.4, temperature=2.0)
    assert scaled["merge_method"] == "bang" and scaled["parameters"] == {"alpha": 0.4, "temperature": 2.0}


# --------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from weightsmith.testbeds.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("bang")
    probe = make_tiny_bert(root / "probe", num_labels=2, seed=0)
    bare = make_tiny_bert(root / "bare", seed=0)
    rng = random.Random(0)
    rows = [{"text": f"{rng.choice(['good', 'bad'])} {rng.choice(['film', 'meal'])}", "label": 0}
            for _ in range(24)]
    rows = [{**r, "label": int(r["text"].startswith("good"))} for r in rows]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return probe, bare, data


def test_run_bang_trains_calibrated_and_averages(classifier, tmp_path: Path) -> None:
    probe, _, data = classifier
    ft_dir = tmp_path / "ft"
    result = run_bang(probe, tmp_path / "out", data, "classification", label_smoothing=0.1, mixup=0.4,
                      alpha=0.25, finetuned=ft_dir, steps=3, lr=1e-3, batch_size=8)
    assert result.recipe["merge_method"] == "wise_ft" and result.finetuned == ft_dir
    train_log = json.loads((ft_dir / "train_log.json").read_text())
    assert train_log["options"]["label_smoothing"] == 0.1
    assert train_log["options"]["mixup"] == 0.4
    base = load_file(str(probe / "model.safetensors"))
    ft = load_file(str(ft_dir / "model.safetensors"))
    out = load_folder(result.out)
    changed = 0
    for k, v in out.items():
        if v.is_floating_point():
            assert torch.equal(v, 0.75 * base[k] + 0.25 * ft[k]), k
            changed += not torch.equal(v, base[k])
    assert changed > 0
    report = json.loads((result.out / "merge_report.json").read_text())
    assert report["merge_method"] == "wise_ft"


def test_bang_command_line(classifier, tmp_path: Path) -> None:
    probe, _, data = classifier
    out = tmp_path / "cli"
    res = CliRunner().invoke(main, ["bang", str(probe), str(out), "--data", str(data), "--task",
                                    "classification", "--steps", "2", "--temperature", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "bang alpha 0.5" in res.output
    assert json.loads((out / "merge_report.json").read_text())["merge_method"] == "bang"


def test_bang_errors(classifier, tmp_path: Path) -> None:
    probe, bare, data = classifier
    with pytest.raises(RecipeError, match="plain WiSE-FT"):
        run_bang(probe, tmp_path / "o", data, "classification", label_smoothing=0.0, mixup=0.0)
    with pytest.raises(RecipeError, match="no classification head"):
        run_bang(bare, tmp_path / "o", data, "classification", steps=1)
    (tmp_path / "exists").mkdir()
    res = CliRunner().invoke(main, ["bang", str(probe), str(tmp_path / "exists"), "--data", str(data),
                                    "--task", "classification", "--steps", "1"])
    assert res.exit_code != 0 and "exists" in res.output
