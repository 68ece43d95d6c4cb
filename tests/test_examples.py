"""The examples in merges/: every input has a command that builds it, and a missing one names it.

Building the inputs takes minutes (testbeds), so these tests check the wiring offline: the
recipes, merges/input-commands.txt and merges/run-example.sh agree with each other, and a
merge whose input is missing fails with the command that builds it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import weightsmith
from weightsmith.errors import CheckpointError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.io.input_hints import FILE_NAME, build_hint, read_commands
from weightsmith.testbeds import NAMES as TESTBEDS

MERGES = Path(__file__).resolve().parent.parent / "merges"
RUN_EXAMPLE = MERGES / "run-example.sh"
RECIPES = sorted(MERGES.glob("*.yaml"))


def example_names() -> list[str]:
    out = subprocess.run(["bash", str(RUN_EXAMPLE), "--list"], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def recipe_inputs(recipe: dict) -> list[str]:
    """Every path a recipe reads: models, base, per-model paths, calibration/evaluation data."""
    paths = [recipe.get("base_model")]
    for entry in recipe.get("models", []):
        model = entry["model"] if isinstance(entry, dict) else entry
        paths.append(model)
        params = entry.get("parameters", {}) if isinstance(entry, dict) else {}
        paths += [v for k, v in params.items() if k in ("source_base", "mask")]
    paths.append(recipe.get("parameters", {}).get("mask"))
    for section in ("calibration", "evaluation"):
        paths.append(recipe.get(section, {}).get("data"))
    return [p for p in paths if isinstance(p, str)]


def test_every_recipe_has_an_example_and_its_header_names_it() -> None:
    names = example_names()
    assert names[0] == "minilm-task-arithmetic"  # the default: the one that runs in seconds
    assert {p.stem for p in RECIPES} | {"bang"} == set(names)
    for path in RECIPES:
        command = "bash merges/run-example.sh" + ("" if path.stem == names[0] else f" {path.stem}")
        header = path.read_text().split("merge_method:")[0]
        assert f"one go: {command}\n" in header or f"one go: {command} " in header, path.name


def test_every_input_a_recipe_reads_has_a_build_command() -> None:
    commands = read_commands(MERGES / FILE_NAME)
    names = example_names()
    for prefix, command in commands.items():
        words = command.split()
        if words[:2] == ["weightsmith", "testbed"]:
            assert words[2] in TESTBEDS and words[3] == f"merges/{prefix.rstrip('/')}", command
        else:
            assert words[:2] == ["bash", "merges/run-example.sh"], command
            assert len(words) == 2 or words[2] in names, command
    for path in RECIPES:
        for ref in recipe_inputs(yaml.safe_load(path.read_text())):
            hint = build_hint([MERGES / ref])
            assert hint is not None, f"{path.name}: nothing in {FILE_NAME} builds {ref}"


def test_longest_prefix_wins_and_uncovered_paths_get_no_hint(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text(
        "# comment\n\ninputs/     make all\ninputs/big/  make big   \n"
    )
    assert read_commands(tmp_path / FILE_NAME) == {"inputs/": "make all", "inputs/big/": "make big"}
    assert build_hint([tmp_path / "inputs" / "big" / "m"]) == "make big"
    assert build_hint([tmp_path / "inputs" / "small"]) == "make all"
    assert build_hint([tmp_path / "elsewhere" / "m"]) is None


def test_missing_example_input_names_the_command_that_builds_it(tmp_path: Path, monkeypatch) -> None:
    # A copy of the examples folder without inputs: what a fresh clone has before any build.
    recipes = tmp_path / "merges"
    recipes.mkdir()
    for name in ("lines.yaml", "minilm-task-arithmetic.yaml", FILE_NAME):
        shutil.copy(MERGES / name, recipes / name)
    monkeypatch.chdir(tmp_path)
    tinylm = "build it with: weightsmith testbed tinylm merges/inputs/tinylm"
    with pytest.raises(CheckpointError, match=tinylm):
        weightsmith.merge(recipes / "lines.yaml", tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"build it with: bash merges/run-example.sh soup-greedy"):
        Checkpoint.open("inputs/soup/lr1e-4", search_dirs=(recipes,))
    # "inputs/minilm-base" has the shape of a Hub id, but the listing says it is a local input.
    with pytest.raises(CheckpointError, match=r"build it with: bash merges/run-example.sh$"):
        weightsmith.merge(recipes / "minilm-task-arithmetic.yaml", tmp_path / "out")
    # Outside an examples folder the error keeps its general advice.
    with pytest.raises(CheckpointError, match="give a local path"):
        Checkpoint.open(tmp_path / "nowhere" / "model")


def test_run_example_rejects_an_unknown_name_before_any_setup() -> None:
    result = subprocess.run(["bash", str(RUN_EXAMPLE), "lienes"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "no example named 'lienes'" in result.stderr and "lines" in result.stderr
