"""weightsmith search: CMA-ES over a recipe's numbers, candidates merged into a live model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from classifier_family import labelled_by, noisy_copy, random_sentences, write_jsonl
from models import load_folder

from weightsmith.errors import RecipeError
from weightsmith.pipeline import merge
from weightsmith.search.optimizer import search
from weightsmith.search.space import Space

pytest.importorskip("transformers")
pytest.importorskip("cma")


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny classifier A, a noisy copy with a negated head, and data labelled by A: a search
    data set and a disjoint held-out one."""
    from weightsmith.testbeds.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("search")
    good = make_tiny_bert(root / "a", num_labels=2, seed=1)
    bad = noisy_copy(good, root / "b", 0.3, torch.Generator().manual_seed(0))
    labelled = labelled_by(good, random_sentences(48), root / "draft.jsonl")
    return {"good": good, "bad": bad, "val": write_jsonl(root / "val.jsonl", labelled[:24]),
            "held_out": write_jsonl(root / "held_out.jsonl", labelled[24:])}


def linear_recipe(family: dict[str, Path]) -> dict[str, object]:
    # The default leans on the bad model: there is room to improve.
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(family["good"]), "parameters": {"weight": 0.2}},
                       {"model": str(family["bad"]), "parameters": {"weight": 0.8}}]}


SPACE = Space.parse({"models[0].parameters.weight": [0, 1], "models[1].parameters.weight": [0, 1]})


def run_search(family, log: Path, trials: int = 10, seed: int = 0, objective=None):
    from weightsmith.search.objective import Objective
    from weightsmith.search.optimizer import search

    recipe = linear_recipe(family)
    objective = objective or Objective(recipe, family["val"], "classification")
    return search(SPACE, recipe, objective, trials=trials, log_path=log, seed=seed, popsize=4)


# --------------------------------------------------------------------------- space
def test_space_applies_paths_gradients_and_defaults() -> None:
    space = Space.parse({"models[1].parameters.weight": [0, 2], "parameters.lambda": [0.2, 1.2],
                         "parameters.density": {"bounds": [0.0, 1.0], "points": 3}})
    assert space.names == ["models[1].parameters.weight", "parameters.lambda", "parameters.density[0]",
                           "parameters.density[1]", "parameters.density[2]"]
    models = [{"model": "a"}, {"model": "b", "parameters": {"weight": 0.5}}]
    recipe = {"merge_method": "ties", "models": models}
    out = space.apply(recipe, [0.5, 1.0, 0.0, 0.25, 1.0])
    assert out["models"][1]["parameters"]["weight"] == 1.0
    assert out["parameters"] == {"lambda": 1.2, "density": [0.0, 0.25, 1.0]}
    assert "parameters" not in recipe  # the input is not changed
    # The recipe's own values in the unit cube; the middle where it has none.
    assert space.default(recipe) == [0.25, 0.5, 0.5, 0.5, 0.5]
    assert space.default(out) == pytest.approx([0.5, 1.0, 0.0, 0.25, 1.0])


def test_space_rejects_bad_entries() -> None:
    with pytest.raises(RecipeError, match="low < high"):
        Space.parse({"parameters.lambda": [1, 0]})
    with pytest.raises(RecipeError, match="not a path"):
        Space.parse({"models[0]..weight": [0, 1]})
    with pytest.raises(RecipeError, match="no 'models' list"):
        Space.parse({"models[0].parameters.weight": [0, 1]}).apply({"merge_method": "linear"}, [0.5])


# --------------------------------------------------------------------------- in memory = on disk
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_in_memory_merge_equals_the_on_disk_merge_bit_for_bit(family, method: str, tmp_path: Path) -> None:
    from weightsmith.search.objective import Objective

    recipe = linear_recipe(family)
    if method == "ties":
        recipe = {"merge_method": "ties", "base_model": str(family["good"]), "dtype": "float32",
                  "parameters": {"density": [0.3, 0.9], "lambda": 0.7},
                  "models": [{"model": str(family["bad"]), "parameters": {"weight": 0.6}}]}
    objective = Objective(recipe, family["val"], "classification")
    writer = objective.merge_in_memory(recipe)
    disk = load_folder(merge(recipe, tmp_path / "out").out)
    assert writer.tensors.keys() == disk.keys()
    assert all(torch.equal(writer.tensors[k], disk[k]) for k in disk)
    # The merge went straight into the live model's parameters, and it scores like the folder.
    assert writer.live and writer.live == set(disk)
    state = objective.evaluator.model.state_dict()
    assert torch.equal(state["classifier.weight"], disk["classifier.weight"])
    from weightsmith.finetune import evaluate

    on_disk = evaluate(tmp_path / "out", family["val"], "classification")["accuracy"]
    assert objective(recipe).target == on_disk


# --------------------------------------------------------------------------- search
def test_search_beats_the_default_on_held_out_data(family, tmp_path: Path) -> None:
    from weightsmith.search.objective import Objective

    result = run_search(family, tmp_path / "trials.jsonl")
    assert len(result.trials) == 10
    assert result.trials[0].params == {"models[0].parameters.weight": 0.2, "models[1].parameters.weight": 0.8}
    best = result.best_trial
    assert best.score >= result.trials[0].score
    recipe = linear_recipe(family)
    held_out = Objective(recipe, family["held_out"], "classification")
    default = held_out(recipe).value
    found = held_out(SPACE.apply(recipe, best.unit)).value
    assert found >= default and found > default  # the default leans on the bad model
    lines = (tmp_path / "trials.jsonl").read_text().splitlines()
    assert [json.loads(line)["trial"] for line in lines] == list(range(10))


def test_search_is_reproducible_under_a_seed(family, tmp_path: Path) -> None:
    a = run_search(family, tmp_path / "a.jsonl", trials=7, seed=3)
    b = run_search(family, tmp_path / "b.jsonl", trials=7, seed=3)
    c = run_search(family, tmp_path / "c.jsonl", trials=7, seed=4)
    assert [t.unit for t in a.trials] == [t.unit for t in b.trials]
    assert [t.score for t in a.trials] == [t.score for t in b.trials]
    assert [t.unit for t in a.trials] != [t.unit for t in c.trials]


def test_resume_from_a_truncated_log_gives_the_same_result(family, tmp_path: Path) -> None:
    from weightsmith.search.objective import Objective

    full = run_search(family, tmp_path / "full.jsonl", trials=10)
    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    log = tmp_path / "cut.jsonl"
    log.write_text("".join(lines[:6]) + lines[6][:20])  # killed while writing trial 6
    inner = Objective(linear_recipe(family), family["val"], "classification")
    calls = []

    def counting(recipe):
        calls.append(recipe)
        return inner(recipe)

    resumed = run_search(family, log, trials=10, objective=counting)
    assert len(calls) == 4  # trials 6..9 only; 0..5 came from the log
    assert [t.unit for t in resumed.trials] == [t.unit for t in full.trials]
    assert [t.score for t in resumed.trials] == [t.score for t in full.trials]
    assert resumed.best == full.best
    assert log.read_text() == (tmp_path / "full.jsonl").read_text()
    # A log from another search is refused, not silently mixed in.
    with pytest.raises(RecipeError, match="different search"):
        run_search(family, log, trials=11, seed=5, objective=counting)


# --------------------------------------------------------------------------- command
def test_search_command_writes_outputs_and_merges_the_best(family, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from weightsmith.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(linear_recipe(family)))
    space = tmp_path / "space.yaml"
    space.write_text("models[0].parameters.weight: [0, 1]\nmodels[1].parameters.weight: [0, 1]\n")
    args = ["search", str(recipe), "--space", str(space), "--eval", str(family["val"]),
            "--task", "classification", "--trials", "5", "--workdir", str(tmp_path / "work"),
            "--popsize", "4", "--quiet"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "best")])
    assert result.exit_code == 0, result.output
    work = tmp_path / "work"
    table = json.loads((work / "trials.json").read_text())
    assert len(table["trials"]) == 5 and (work / "trials.csv").read_text().count("\n") == 6
    assert (work / "search.png").stat().st_size > 0
    best = yaml.safe_load((work / "best_recipe.yaml").read_text())
    weights = [m["parameters"]["weight"] for m in best["models"]]
    assert weights == list(table["best_params"].values())
    # --out is the best recipe merged to disk normally.
    assert all(torch.equal(a, b) for a, b in zip(load_folder(tmp_path / "best").values(),
                                                 load_folder(merge(best, tmp_path / "again").out).values(),
                                                 strict=True))
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "--resume" in again.output
    resumed = CliRunner().invoke(main, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((work / "trials.json").read_text()) == table


def test_one_dimensional_space_and_lower_is_better(family, tmp_path: Path) -> None:
    from weightsmith.search.objective import Objective
    from weightsmith.search.optimizer import search

    recipe = linear_recipe(family)
    space = Space.parse({"models[0].parameters.weight": [0, 1]})
    objective = Objective(recipe, family["val"], "classification", metric="loss")
    assert not objective.higher_is_better
    result = search(space, recipe, objective, trials=5, log_path=tmp_path / "t.jsonl",
                    higher_is_better=False, popsize=4)
    assert result.best_trial.score == min(t.score for t in result.trials)
    assert result.best_trial.score < result.trials[0].score


def test_control_task_is_a_weighted_scalarisation(family) -> None:
    from weightsmith.search.objective import Objective

    recipe = linear_recipe(family)
    both = Objective(recipe, family["val"], "classification", metric="loss",
                     control=family["held_out"], control_weight=0.25)(recipe)
    control_alone = Objective(recipe, family["held_out"], "classification", metric="loss")(recipe)
    assert both.control == control_alone.target and both.control != both.target
    assert both.value == pytest.approx(0.75 * both.target + 0.25 * both.control)
    with pytest.raises(RecipeError, match="control-weight"):
        Objective(recipe, family["val"], "classification", control=family["held_out"], control_weight=2)


# --------------------------------------------------------------------------- inputs opened once
def test_inputs_are_opened_once_per_search_not_per_trial(family, tmp_path: Path, monkeypatch) -> None:
    from weightsmith.io.checkpoint import Checkpoint
    from weightsmith.search.objective import Objective

    opened = []
    real_open = Checkpoint.open.__func__

    def counting_open(cls, ref, *args, **kwargs):
        opened.append(ref)
        return real_open(cls, ref, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "open", classmethod(counting_open))
    recipe = linear_recipe(family)
    objective = Objective(recipe, family["val"], "classification")
    assert sorted(opened) == sorted([str(family["good"]), str(family["bad"])])
    first = {ref: ckpt for ref, ckpt in objective.inputs.items()}
    result = search(SPACE, recipe, objective, trials=6, log_path=tmp_path / "t.jsonl", popsize=4)
    assert len(result.trials) == 6 and len(opened) == 2  # six trials re-merged, nothing reopened
    assert all(objective.inputs[ref] is ckpt and ckpt._fds for ref, ckpt in first.items())  # kept open
    # A candidate still merges what a fresh plan merges (the open inputs are not stale).
    unit = result.best_trial.unit
    writer = objective.merge_in_memory(SPACE.apply(recipe, unit))
    disk = load_folder(merge(SPACE.apply(recipe, unit), tmp_path / "out").out)
    assert all(torch.equal(writer.tensors[k], disk[k]) for k in disk)


# --------------------------------------------------------------------------- workdir checks
@pytest.mark.parametrize("where", ["model folder", "inside model folder", "recipe", "eval data",
                                   "log named like an input"])
def test_search_workdir_overlapping_an_input_is_refused_before_any_work(family, tmp_path: Path,
                                                                        where: str) -> None:
    from click.testing import CliRunner

    from weightsmith.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(linear_recipe(family)))
    space = tmp_path / "space.yaml"
    space.write_text("models[0].parameters.weight: [0, 1]\n")
    data = family["val"]
    if where == "log named like an input":  # the eval data would be overwritten by trials.json
        data = tmp_path / "trials.json"
        data.write_bytes(family["val"].read_bytes())
    workdir = {"model folder": family["good"], "inside model folder": family["bad"] / "runs",
               "recipe": recipe, "eval data": data, "log named like an input": tmp_path}[where]
    before = {p: p.stat().st_mtime_ns for p in (family["good"], family["bad"], recipe, data)}
    result = CliRunner().invoke(main, ["search", str(recipe), "--space", str(space), "--eval", str(data),
                                       "--task", "classification", "--trials", "2", "--workdir",
                                       str(workdir), "--quiet"])
    assert result.exit_code == 5, result.output  # OutputError
    assert "--workdir" in result.output and "choose" in result.output
    label = {"model folder": "input model", "inside model folder": "input model", "recipe": "recipe file",
             "eval data": "eval data", "log named like an input": "eval data"}[where]
    assert label in result.output
    assert not (family["bad"] / "runs").exists() and not (tmp_path / "trials.jsonl").exists()
    assert before == {p: p.stat().st_mtime_ns for p in before}


def test_search_command_hands_ray_options_to_the_pool(family, tmp_path: Path, monkeypatch) -> None:
    """The command's wiring of --executor ray (the pool itself: tests/test_ray_search.py)."""
    from click.testing import CliRunner

    from weightsmith.cli import main
    from weightsmith.search import population
    from weightsmith.search.objective import Score

    asked = []

    def fake_open_pool(executor, args, address, workers, population_size):
        asked.append((executor, address, workers, population_size, args["data"]))

        def objective(recipe):
            a, b = (m["parameters"]["weight"] for m in recipe["models"])
            return Score(a - b, a - b)

        return population.SequentialPool(objective)

    monkeypatch.setattr(population, "open_pool", fake_open_pool)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(linear_recipe(family)))
    space = tmp_path / "space.yaml"
    space.write_text("models[0].parameters.weight: [0, 1]\nmodels[1].parameters.weight: [0, 1]\n")
    args = ["search", str(recipe), "--space", str(space), "--eval", str(family["val"]), "--task",
            "classification", "--trials", "6", "--workdir", str(tmp_path / "work"), "--quiet"]
    result = CliRunner().invoke(main, [*args, "--executor", "ray", "--ray-address", "10.0.0.1:6379",
                                       "--ray-workers", "3"])
    assert result.exit_code == 0, result.output
    assert asked == [("ray", "10.0.0.1:6379", 3, 6, str(family["val"]))]  # 6: cma's default popsize in 2-D
    assert len(json.loads((tmp_path / "work" / "trials.json").read_text())["trials"]) == 6
    refused = CliRunner().invoke(main, [*args, "--ray-workers", "3", "--overwrite"])
    assert refused.exit_code == 2 and "need --executor ray" in refused.output
