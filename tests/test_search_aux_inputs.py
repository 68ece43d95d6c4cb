"""A search opens the checkpoints a recipe's parameters name (here a transfer's ``source_base``)
once, like its base and models, not once per trial; each candidate still merges what a fresh
on-disk merge of it gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from classifier_family import noisy_copy
from models import load_folder
from test_search import family  # noqa: F401  (family: the fixture)

from weightsmith.pipeline import merge
from weightsmith.search.space import Space

pytest.importorskip("transformers")
pytest.importorskip("cma")


def test_a_parameters_checkpoint_is_opened_once_per_search(family, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    from weightsmith.io.checkpoint import Checkpoint
    from weightsmith.search.objective import Objective
    from weightsmith.search.optimizer import search

    source = noisy_copy(family["good"], tmp_path / "source", 0.1, torch.Generator().manual_seed(3))
    recipe = {"merge_method": "transfer", "dtype": "float32", "base_model": str(family["good"]),
              "models": [{"model": str(family["bad"]),
                          "parameters": {"weight": 0.5, "source_base": str(source)}}]}
    opened: list[str] = []
    real_open = Checkpoint.open.__func__

    def counting_open(cls, ref, *args, **kwargs):
        opened.append(str(ref))
        return real_open(cls, ref, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "open", classmethod(counting_open))
    objective = Objective(recipe, family["val"], "classification")
    space = Space.parse({"models[0].parameters.weight": [0, 1]})
    result = search(space, recipe, objective, trials=3, log_path=tmp_path / "t.jsonl", popsize=4)
    assert len(result.trials) == 3
    assert len({t.params["models[0].parameters.weight"] for t in result.trials}) == 3  # three merges
    # Base, model and the source base: each opened once, for the first plan, over three trials.
    assert sorted(opened) == sorted([str(family["good"]), str(family["bad"]), str(source)])
    assert [c.root for c in objective.aux_inputs.values()] == [source]
    # A candidate still merges what a fresh plan merges (the reused source is not stale).
    candidate = space.apply(recipe, result.trials[-1].unit)
    writer = objective.merge_in_memory(candidate)
    disk = load_folder(merge(candidate, tmp_path / "out").out)
    assert all(torch.equal(writer.tensors[k], disk[k]) for k in disk)
