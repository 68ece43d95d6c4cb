"""Model references parsed in one place (weightsmith/model_ref.py), and its corners as the recipe,
the reader, the stages and the model card see them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models import LLAMA_CONFIG, random_state, save_model
from weightsmith.errors import CheckpointError, RecipeError
from weightsmith.model_ref import ModelRef, at_revision, looks_like_hub_id, never_local, parse_model_ref


@pytest.mark.parametrize(
    "text, want",
    [
        ("org/name", ModelRef("org/name")),
        ("org/name@v1.0", ModelRef("org/name", "v1.0")),
        ("org/name@refs/pr/1", ModelRef("org/name", "refs/pr/1")),  # a revision may hold '/'
        ("org/base@v1+org/ad@abc", ModelRef("org/base", "v1", ModelRef("org/ad", "abc"))),
        (" org/base + org/ad ", ModelRef("org/base", None, ModelRef("org/ad"))),
        ("./models/x@v2", ModelRef("./models/x@v2")),  # a path: no revision
        ("/abs/x@v2", ModelRef("/abs/x@v2")),
        ("plain@v2", ModelRef("plain@v2")),  # no org/ part: not a Hub id, so no revision
        ("stage+org/ad@v2", ModelRef("stage", None, ModelRef("org/ad", "v2"))),
    ],
)
def test_parse_and_write_back(text, want):
    got = parse_model_ref(text, exists=never_local)
    assert got == want
    assert parse_model_ref(str(got), exists=never_local) == got  # str() writes what parses back
    if text == text.strip():
        assert str(got) == text


@pytest.mark.parametrize("text", ["a+b+c", "a+", "+b", "a + "])
def test_a_lora_reference_has_exactly_two_sides(text):
    with pytest.raises(RecipeError, match=r"models\[0\]: .*exactly one '\+'"):
        parse_model_ref(text, where="models[0]")
    with pytest.raises(CheckpointError, match="BASE\\+ADAPTER"):
        parse_model_ref(text, error=CheckpointError)


def test_existing_local_paths_are_never_split(tmp_path, monkeypatch):
    odd = tmp_path / "m+x@1"
    odd.mkdir()
    assert parse_model_ref(str(odd)) == ModelRef(str(odd))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "base@2").mkdir()
    # relative and shaped like a Hub id, but it exists: a path, the whole of it
    assert parse_model_ref("org/base@2") == ModelRef("org/base@2")
    assert parse_model_ref("org/base@2+org/ad@3") == ModelRef("org/base@2", None, ModelRef("org/ad", "3"))
    assert parse_model_ref("m+x@1") == ModelRef("m+x@1")
    assert at_revision("org/base@2") == ModelRef("org/base", "2")  # one side, by shape alone


def test_hub_id_shape():
    assert looks_like_hub_id("org/name") and looks_like_hub_id("org/name@refs/pr/1")
    assert not looks_like_hub_id("./org/name") and not looks_like_hub_id("/abs/path")
    assert not looks_like_hub_id("org/base+org/ad") and not looks_like_hub_id("name")


def test_reader_opens_local_folders_with_plus_and_at(tmp_path):
    from tests.test_lora_parity import ADAPTERS, write_adapter
    from weightsmith.io.checkpoint import Checkpoint
    from weightsmith.io.lora import LoraCheckpoint

    state = random_state(LLAMA_CONFIG, seed=5)
    odd = save_model(tmp_path / "a+b@c", state, LLAMA_CONFIG, shards=1)
    plain = Checkpoint.open(odd)
    assert not isinstance(plain, LoraCheckpoint) and plain.root == odd
    base = save_model(tmp_path / "base@2", state, LLAMA_CONFIG, shards=1)
    adapter = write_adapter(tmp_path / "ad@3", state, 7, ADAPTERS["ad1"])
    adapted = Checkpoint.open(f"{base}+{adapter}")
    assert isinstance(adapted, LoraCheckpoint) and adapted.base.root == base
    key = "model.layers.1.self_attn.v_proj.weight"
    assert not torch.equal(adapted.read(key), state[key])
    with pytest.raises(CheckpointError, match="exactly one"):
        Checkpoint.open(f"{base}+{adapter}+{adapter}")


def test_recipe_keeps_the_text_and_writes_the_object_form():
    from weightsmith.recipe import load_recipe

    recipe = load_recipe({
        "merge_method": "linear",
        "models": [
            {"model": {"model": {"path": "org/base", "revision": "r1"},
                       "lora": {"path": "org/ad", "revision": "r2"}}, "parameters": {"weight": 1.0}},
            {"model": " org/x@v1 ", "parameters": {"weight": 1.0}},
        ],
    })
    assert [m.ref for m in recipe.models] == ["org/base@r1+org/ad@r2", " org/x@v1 "]
    with pytest.raises(RecipeError, match=r"models\[0\].*exactly one"):
        load_recipe({"merge_method": "linear", "models": [{"model": "a+b+c", "parameters": {"weight": 1}}]})


def test_model_card_lists_both_hub_sides_of_a_lora_input():
    from weightsmith.io.model_card import hub_input_ids

    inputs = [
        {"model": "acme/base@v1+acme/lora@v2", "revision": "1" * 40,
         "adapter": {"model": "acme/lora@v2", "revision": "2" * 40}},
        {"model": "models/local+acme/lora2", "revision": None,  # a local base: only the adapter
         "adapter": {"model": "acme/lora2", "revision": "3" * 40}},
        {"model": "acme/base", "revision": "1" * 40},  # listed once
        {"model": "models/x+y", "revision": None},  # a local folder with '+': nothing
    ]
    assert hub_input_ids(inputs) == ["acme/base", "acme/lora", "acme/lora2"]


def _stages(tmp_path: Path, text: str):
    from weightsmith.stages import load_stages

    path = tmp_path / "multi.yaml"
    path.write_text(text)
    return load_stages(path)


def test_stage_references(tmp_path):
    from weightsmith.stages import _substitute

    # A local folder beside the recipe whose name has a '+' is a folder, not stage `my` + adapter.
    save_model(tmp_path / "my+model", random_state(LLAMA_CONFIG, seed=1), LLAMA_CONFIG, shards=1)
    staged = _stages(tmp_path, "name: first\nmerge_method: linear\nmodels: [my+model]\n"
                               "parameters: {weight: 1}\n---\nmerge_method: linear\n"
                               "models: [first]\nparameters: {weight: 1}\n")
    assert [s.needs for s in staged.stages] == [[], ["first"]]
    raw = {"models": [{"model": "first+org/ad@v2"}, {"model": "first@v2"}], "base_model": "first"}
    used: set[str] = set()
    out = _substitute(raw, {"first": Path("/cache/first-1")}, used)
    assert out["models"] == [{"model": "/cache/first-1+org/ad@v2"}, {"model": "first@v2"}]
    assert out["base_model"] == "/cache/first-1" and used == {"first"}
    with pytest.raises(RecipeError, match=r"stage \(final, unnamed\): 'first\+a\+b': .*exactly one"):
        _stages(tmp_path, "name: first\nmerge_method: linear\nmodels: [org/x]\nparameters: {weight: 1}\n"
                          "---\nmerge_method: linear\nmodels: [first+a+b]\nparameters: {weight: 1}\n")
