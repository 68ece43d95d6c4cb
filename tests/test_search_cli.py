"""`weightsmith search --head NAME MODEL_DIR DATA` (repeatable): a multi-task score from the command
line (HeadsObjective's); the workdir's inputs fingerprint refusing a resume over changed inputs;
the options --head replaces refused beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from test_search import family, linear_recipe  # noqa: F401  (family: the fixture)

from weightsmith.cli import main

pytest.importorskip("transformers")
pytest.importorskip("cma")


def write_inputs(family, folder: Path) -> tuple[Path, Path]:  # noqa: F811
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(linear_recipe(family)))
    space = folder / "space.yaml"
    space.write_text("models[0].parameters.weight: [0, 1]\nmodels[1].parameters.weight: [0, 1]\n")
    return recipe, space


def search_args(recipe: Path, space: Path, workdir: Path, trials: int, *more: str) -> list[str]:
    return ["search", str(recipe), "--space", str(space), "--task", "classification", "--metric", "loss",
            "--trials", str(trials), "--workdir", str(workdir), "--popsize", "4", "--quiet", *more]


def logged(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "trials.jsonl").read_text().splitlines()]


def copy_rows(source: Path, target: Path, rows: slice = slice(None)) -> Path:
    lines = source.read_text().splitlines(keepends=True)
    target.write_text("".join(lines[rows]))
    return target


def test_two_head_search_logs_the_score_heads_objective_gives(family, tmp_path: Path) -> None:  # noqa: F811
    from weightsmith.search.heads import Head, HeadsObjective

    recipe, space = write_inputs(family, tmp_path)
    heads = [Head("good", family["good"], family["val"]), Head("bad", family["bad"], family["held_out"])]
    result = CliRunner().invoke(main, search_args(
        recipe, space, tmp_path / "work", 3,
        "--head", "good", str(family["good"]), str(family["val"]),
        "--head", "bad", str(family["bad"]), str(family["held_out"])))
    assert result.exit_code == 0, result.output
    rows = logged(tmp_path / "work")
    assert [r["trial"] for r in rows] == [0, 1, 2]
    objective = HeadsObjective(linear_recipe(family), heads, "classification", metric="loss", random_seed=0)
    per_head = objective.scores(linear_recipe(family))
    assert per_head["good"] != per_head["bad"]  # two tasks, two scores: the mean is not either one
    assert rows[0]["score"] == objective(linear_recipe(family)).value
    assert rows[0]["score"] == pytest.approx((per_head["good"] + per_head["bad"]) / 2)
    recorded = json.loads((tmp_path / "work" / "search_inputs.json").read_text())
    assert {"--head good data", "--head bad data", "--head good model",
            "--head bad model"} <= set(recorded)


def test_resume_with_a_changed_head_data_file_is_refused(family, tmp_path: Path) -> None:  # noqa: F811
    recipe, space = write_inputs(family, tmp_path)
    data = copy_rows(family["held_out"], tmp_path / "bad.jsonl")
    work = tmp_path / "work"
    heads = ["--head", "good", str(family["good"]), str(family["val"]),
             "--head", "bad", str(family["bad"]), str(data)]
    first = CliRunner().invoke(main, search_args(recipe, space, work, 1, *heads))
    assert first.exit_code == 0, first.output
    same = CliRunner().invoke(main, search_args(recipe, space, work, 2, *heads, "--resume"))
    assert same.exit_code == 0, same.output  # unchanged inputs resume
    before = (work / "trials.jsonl").read_text()
    assert len(before.splitlines()) == 2
    copy_rows(family["held_out"], data, slice(0, 12))  # the task's data changes under the search
    changed = CliRunner().invoke(main, search_args(recipe, space, work, 3, *heads, "--resume"))
    assert changed.exit_code == 2, changed.output  # RecipeError
    assert "--head bad data" in changed.output and "--overwrite" in changed.output
    assert "--head good" not in changed.output  # only what changed is named
    assert (work / "trials.jsonl").read_text() == before  # nothing scored, nothing logged
    # Another head's model folder (the good task now scored with the bad model) is refused too.
    copy_rows(family["held_out"], data)
    swapped = ["--head", "good", str(family["bad"]), str(family["val"]), *heads[4:]]
    refused = CliRunner().invoke(main, search_args(recipe, space, work, 3, *swapped, "--resume"))
    assert refused.exit_code == 2 and "--head good model" in refused.output, refused.output


def test_resume_with_a_changed_eval_file_is_refused(family, tmp_path: Path) -> None:  # noqa: F811
    recipe, space = write_inputs(family, tmp_path)
    data = copy_rows(family["val"], tmp_path / "val.jsonl")
    work = tmp_path / "work"
    first = CliRunner().invoke(main, search_args(recipe, space, work, 1, "--eval", str(data)))
    assert first.exit_code == 0, first.output
    copy_rows(family["held_out"], data)
    changed = CliRunner().invoke(main, search_args(recipe, space, work, 2, "--eval", str(data), "--resume"))
    assert changed.exit_code == 2 and "eval data" in changed.output, changed.output
    other_metric = search_args(recipe, space, work, 2, "--eval", str(data), "--resume")
    other_metric[other_metric.index("loss")] = "accuracy"
    copy_rows(family["val"], data)  # the data back as logged: only the metric differs now
    refused = CliRunner().invoke(main, other_metric)
    assert refused.exit_code == 2 and "scoring options" in refused.output, refused.output
    assert len(logged(work)) == 1
    # --overwrite starts afresh over the old log, recording the new inputs.
    afresh = CliRunner().invoke(main, [*other_metric[:-1], "--overwrite"])
    assert afresh.exit_code == 0 and len(logged(work)) == 2, afresh.output


@pytest.mark.parametrize("extra, named", [
    (["--eval", "VAL"], "--head with --eval"),
    (["--model-dir", "GOOD"], "--head with --model-dir"),
    (["--eval", "VAL", "--model-dir", "GOOD"], "--head with --eval and --model-dir"),
    (["--control", "VAL"], "--control with --head"),
    (["--head", "good", "GOOD", "VAL"], "--head good: given twice"),
])
def test_head_with_the_options_it_replaces_is_refused(family, tmp_path: Path, extra: list[str],  # noqa: F811
                                                      named: str) -> None:
    recipe, space = write_inputs(family, tmp_path)
    where = {"VAL": str(family["val"]), "GOOD": str(family["good"])}
    args = search_args(recipe, space, tmp_path / "work", 2, "--head", "good", str(family["good"]),
                       str(family["val"]), *[where.get(a, a) for a in extra])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and named in result.output, result.output
    assert not (tmp_path / "work").exists()  # refused before any work


def test_neither_eval_nor_head_is_refused(family, tmp_path: Path) -> None:  # noqa: F811
    recipe, space = write_inputs(family, tmp_path)
    result = CliRunner().invoke(main, search_args(recipe, space, tmp_path / "work", 2))
    assert result.exit_code == 2 and "--eval" in result.output and "--head" in result.output, result.output


def test_heads_travel_to_the_pool_as_plain_picklable_arguments(family, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    """What --executor ray hands each actor (the actors themselves: tests/test_ray_search.py)."""
    import pickle

    from weightsmith.search import population
    from weightsmith.search.heads import Head
    from weightsmith.search.objective import Score

    asked = []

    def fake_open_pool(executor, args, address, workers, population_size):
        asked.append((executor, pickle.loads(pickle.dumps(args))))
        return population.SequentialPool(lambda recipe: Score(0.0, 0.0))

    monkeypatch.setattr(population, "open_pool", fake_open_pool)
    recipe, space = write_inputs(family, tmp_path)
    result = CliRunner().invoke(main, search_args(
        recipe, space, tmp_path / "work", 1, "--executor", "ray",
        "--head", "a", str(family["good"]), str(family["val"]),
        "--head", "b", str(family["bad"]), str(family["held_out"])))
    assert result.exit_code == 0, result.output
    (executor, args), = asked
    assert executor == "ray" and args["metric"] == "loss"
    assert args["heads"] == [Head("a", str(family["good"]), str(family["val"])),
                             Head("b", str(family["bad"]), str(family["held_out"]))]
    assert not {"data", "model_dir", "control"} & set(args)  # HeadsObjective takes none of them


def test_a_workdir_inside_a_head_model_folder_is_refused(family, tmp_path: Path) -> None:  # noqa: F811
    recipe, space = write_inputs(family, tmp_path)
    head = tmp_path / "head"  # a head's model folder that is not one of the recipe's inputs
    head.mkdir()
    (head / "config.json").write_text((family["bad"] / "config.json").read_text())
    result = CliRunner().invoke(main, search_args(
        recipe, space, head / "runs", 2, "--head", "good", str(family["good"]), str(family["val"]),
        "--head", "other", str(head), str(family["held_out"])))
    assert result.exit_code == 5, result.output  # OutputError
    assert "inside the --head other model folder" in result.output
    assert not (head / "runs").exists()
