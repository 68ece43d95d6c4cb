"""Parity with mergekit 0.1.5 for a multi-stage recipe (mergekit-multi): the final stage's output
equal to one bf16 step.

recipes_multi/<recipe>.yaml holds several YAML documents naming the inputs (base, ft0, ...) and
earlier stages; golden_multi/<recipe>.safetensors is what ``mergekit-multi`` wrote to
``--out-path`` (the unnamed document) for it, made by ``benchmarks/parity/make_golden.py --multi``.
The inputs are the same rebuilt ones as tests/test_parity_mergekit.py's (checked there against
inputs.json's digests).

With WEIGHTSMITH_MERGEKIT=/path/to/mergekit-yaml set, ``mergekit-multi`` beside it also runs live
on inputs built from other seeds, and every stage (intermediates too) is compared.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from models import load_folder
from safetensors.torch import load_file
from test_parity_mergekit import DATA, MERGEKIT_ENV, build_inputs, check_loads, check_parity, load_states

import weightsmith

MULTI_RECIPES = sorted((DATA / "recipes_multi").glob("*.yaml"))
MULTI_GOLDEN = DATA / "golden_multi"
MODEL_KEYS = ("model", "base_model")


def materialize_stages(recipe_path: Path, folders: dict[str, Path]) -> list[dict[str, Any]]:
    """The recipe's documents with the input names (base, ft0, ...) replaced by the input
    folders' paths; stage names stay as they are (each tool resolves those itself)."""

    def path_of(name: str) -> str:
        return str(folders[name].resolve()) if name in folders else name

    docs = [d for d in yaml.safe_load_all(recipe_path.read_text()) if d is not None]
    for doc in docs:
        if "base_model" in doc:
            doc["base_model"] = path_of(doc["base_model"])
        doc["models"] = [{**entry, "model": path_of(entry["model"])} for entry in doc["models"]]
    return docs


def write_stages(docs: list[dict[str, Any]], path: Path) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def mergekit_multi(mergekit_yaml: str | Path) -> Path:
    """mergekit-multi, installed beside mergekit-yaml."""
    exe = Path(mergekit_yaml).parent / "mergekit-multi"
    if not exe.is_file():
        raise FileNotFoundError(f"{exe}: no mergekit-multi beside {mergekit_yaml}")
    return exe


def run_mergekit_multi(exe: str | Path, config: Path, out: Path, intermediates: Path) -> Path:
    """Run ``mergekit-multi`` offline: named stages into ``intermediates/<name>``, the unnamed
    (final) one into ``out``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [str(exe), str(config), "--out-path", str(out), "--intermediate-dir", str(intermediates)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_inputs(tmp_path_factory.mktemp("multi-inputs"))


def run_weightsmith(docs: list[dict[str, Any]], root: Path) -> Any:
    """weightsmith.merge on the multi-stage recipe; a StagedMergeResult (its ``stages``)."""
    recipe = write_stages(docs, root / "multi.yaml")
    return weightsmith.merge(str(recipe), root / "weightsmith", fsync=False, stage_cache=root / "stages")


def input_tensors(folders: dict[str, Path]) -> list[dict[str, torch.Tensor]]:
    return list(load_states(folders).values())


def test_every_multi_recipe_has_a_golden() -> None:
    assert MULTI_RECIPES
    assert sorted(p.stem for p in MULTI_RECIPES) == sorted(p.stem for p in MULTI_GOLDEN.glob("*.safetensors"))
    for recipe in MULTI_RECIPES:  # a real multi-stage recipe: several documents, later ones naming earlier
        docs = list(yaml.safe_load_all(recipe.read_text()))
        names = {d["name"] for d in docs if "name" in d}
        assert len(docs) >= 3 and names, f"{recipe.name}: not a 3-stage recipe"


@pytest.mark.parametrize("recipe", MULTI_RECIPES, ids=lambda p: p.stem)
def test_multistage_matches_mergekit_golden(recipe: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    docs = materialize_stages(recipe, inputs)
    result = run_weightsmith(docs, tmp_path)
    assert len(result.stages) == len(docs), "every stage should have run"
    ours = load_folder(result.out)
    theirs = load_file(str(MULTI_GOLDEN / f"{recipe.stem}.safetensors"))
    check_parity(recipe.stem, ours, theirs, input_tensors(inputs))
    check_loads(result.out, ours)


@pytest.fixture(scope="module")
def live_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_inputs(tmp_path_factory.mktemp("multi-live-inputs"), seed_offset=1000)


@pytest.mark.skipif(not os.environ.get(MERGEKIT_ENV), reason=f"set {MERGEKIT_ENV}=/path/to/mergekit-yaml")
@pytest.mark.parametrize("recipe", MULTI_RECIPES, ids=lambda p: p.stem)
def test_multistage_matches_mergekit_live(recipe: Path, live_inputs: dict[str, Path], tmp_path: Path) -> None:
    docs = materialize_stages(recipe, live_inputs)
    config = write_stages(docs, tmp_path / "mergekit.yaml")
    theirs_out = run_mergekit_multi(
        mergekit_multi(os.environ[MERGEKIT_ENV]), config, tmp_path / "mergekit", tmp_path / "mergekit-stages"
    )
    result = run_weightsmith(docs, tmp_path)
    states = input_tensors(live_inputs)
    for outcome in result.stages:  # every stage, intermediates first
        name = outcome.stage.name
        theirs = load_folder(theirs_out if name is None else tmp_path / "mergekit-stages" / name)
        label = f"{recipe.stem}, stage {outcome.stage.label} (live)"
        check_parity(label, load_folder(outcome.out), theirs, states)
