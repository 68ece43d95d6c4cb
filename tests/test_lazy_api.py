"""The lazy API plans like `weightsmith merge` (issue 15): task models that wrap their base
(`bert.` + a head) map onto it by prefix, integer buffers come from the reference, and
extra_keys decides about the heads; a local path that is missing says so, not "not on the Hub"."""

from __future__ import annotations

import os

import pytest
import torch
from models import LLAMA_CONFIG, load_folder, perturb, random_state, save_model

import weightsmith as ws
from weightsmith.errors import CheckpointError, MergeError

NAME = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture
def wrapped(tmp_path):
    """A base with an integer buffer, and two fine-tunes that prefix every name with `bert.`,
    lack the buffer and add a classifier head (what transformers' task models look like)."""
    base_state = random_state(LLAMA_CONFIG, seed=0)
    base_state["model.embeddings.position_ids"] = torch.arange(8)
    base = save_model(tmp_path / "base", base_state, LLAMA_CONFIG, shards=1)
    fts = []
    for seed in (1, 2):
        state = {f"bert.{k}": v for k, v in perturb(base_state, seed).items() if "position_ids" not in k}
        state["classifier.weight"] = torch.ones(2, 32, dtype=torch.bfloat16)
        fts.append(save_model(tmp_path / f"ft{seed}", state, LLAMA_CONFIG, shards=1))
    return base, fts


def test_expression_maps_prefixed_task_models_onto_the_base(wrapped, tmp_path):
    base_dir, (a_dir, b_dir) = wrapped
    base, a, b = (ws.Checkpoint.open(p) for p in (base_dir, a_dir, b_dir))
    merged = base + 0.4 * ((a - base) + (b - base))
    expected = base.read(NAME).float() + 0.4 * (
        (a.read(f"bert.{NAME}").float() - base.read(NAME).float())
        + (b.read(f"bert.{NAME}").float() - base.read(NAME).float())
    )
    assert torch.allclose(merged.tensor(NAME), expected, atol=1e-7)
    assert torch.equal(merged.tensor(f"bert.{NAME}"), merged.tensor(NAME))  # an input's spelling
    assert torch.equal(merged.tensor("model.embeddings.position_ids"), torch.arange(8))
    assert "classifier.weight" not in merged.keys() and NAME in merged.keys()
    with pytest.raises(MergeError, match=r"extra_keys=\"ignore\""):
        merged.save(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    result = merged.save(tmp_path / "out", extra_keys="ignore", memory_budget="8KB")
    out = load_folder(tmp_path / "out")
    assert set(out) == set(base.keys())  # the base's names, no head
    assert torch.equal(out[NAME], expected.bfloat16())
    assert torch.equal(out["model.embeddings.position_ids"], torch.arange(8))
    assert any("'bert.'" in note for note in result.plan.notes)


def test_the_reference_is_the_task_vectors_base_whatever_the_order(wrapped):
    base_dir, (a_dir, _) = wrapped
    base, a = ws.Checkpoint.open(base_dir), ws.Checkpoint.open(a_dir)
    tv = a - base
    assert tv.reference() is base and (0.5 * tv + base).reference() is base
    assert tv.inputs() == [base, a]
    delta = a.read(f"bert.{NAME}").float() - base.read(NAME).float()
    assert torch.equal(tv.tensor(NAME), delta)
    assert tv.norm() > 0


def test_an_unknown_tensor_name_suggests_the_reference_spelling(wrapped):
    base_dir, (a_dir, _) = wrapped
    base, a = ws.Checkpoint.open(base_dir), ws.Checkpoint.open(a_dir)
    with pytest.raises(MergeError, match="did you mean 'model.layers.1.self_attn.q_proj.weight'"):
        (a - base).tensor("encoder.layers.1.self_attn.q_proj.weight")


def test_a_missing_local_path_shaped_like_a_hub_id_is_named_as_local(tmp_path, monkeypatch):
    (tmp_path / "merges" / "inputs" / "minilm-base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="did you mean 'merges/inputs/minilm-base'"):
        ws.Checkpoint.open("inputs/minilm-base")
    with pytest.raises(CheckpointError, match="read as a local path, not a Hub id, since merges/ is"):
        ws.Checkpoint.open("merges/minilm-typo")
    # A true Hub id that is not cached (tests run offline) says both readings failed.
    with pytest.raises(CheckpointError, match="no local folder 'nobody-org/no-model' exists either"):
        ws.Checkpoint.open("nobody-org/no-model")
    assert os.getcwd() == str(tmp_path)
