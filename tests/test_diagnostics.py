"""Task-vector diagnostics on tiny checkpoints whose answers are computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from models import make_family
from safetensors.torch import save_file

from weightsmith.diagnostics import (
    cosine_similarity_matrix,
    layer_of,
    sign_conflicts_by_layer,
    task_vector_norms,
)
from weightsmith.errors import MergeError
from weightsmith.io.checkpoint import Checkpoint

BASE = {
    "model.embed_tokens.weight": torch.tensor([1.0, 1.0]),
    "model.layers.0.w": torch.tensor([[1.0, 1.0], [1.0, 1.0]]),
    "model.layers.1.w": torch.tensor([2.0, 2.0, 2.0]),
    "step": torch.tensor([7], dtype=torch.int64),  # not floating point: ignored
}
# task vectors (finetuned - base), chosen for easy hand arithmetic
TV = {
    "a": {"model.embed_tokens.weight": [0.0, 0.0], "model.layers.0.w": [[1.0, 2.0], [0.0, -1.0]],
          "model.layers.1.w": [3.0, 0.0, 4.0]},
    "b": {"model.embed_tokens.weight": [1.0, 1.0], "model.layers.0.w": [[-1.0, 2.0], [0.0, 1.0]],
          "model.layers.1.w": [0.0, 0.0, 0.0]},
    "c": {"model.embed_tokens.weight": [0.0, -1.0], "model.layers.0.w": [[0.0, 0.0], [0.0, 0.0]],
          "model.layers.1.w": [-1.0, 0.0, 1.0]},
}


@pytest.fixture
def models(tmp_path):
    save_file(BASE, str(tmp_path / "base.safetensors"))
    paths = {}
    for key, tv in TV.items():
        state = {k: (v + torch.tensor(tv[k]) if k in tv else v.clone()) for k, v in BASE.items()}
        paths[key] = tmp_path / f"{key}.safetensors"
        save_file(state, str(paths[key]))
    return tmp_path / "base.safetensors", paths


def test_layer_groups():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "layer 12"
    assert layer_of("transformer.h.3.attn.c_attn.weight") == "layer 3"
    assert layer_of("model.embed_tokens.weight") == "other" and layer_of("lm_head.weight") == "other"


def test_norms_by_layer_and_total(models):
    base, m = models
    norms = task_vector_norms(base, [m["a"], m["b"]])
    a, b = norms[str(m["a"])], norms[str(m["b"])]
    assert list(a) == ["layer 0", "layer 1", "other", "total"]
    assert a["layer 0"] == pytest.approx(math.sqrt(6)) and a["layer 1"] == pytest.approx(5.0)
    assert a["other"] == 0.0 and a["total"] == pytest.approx(math.sqrt(31))
    assert b["layer 0"] == pytest.approx(math.sqrt(6)) and b["layer 1"] == 0.0
    assert b["other"] == pytest.approx(math.sqrt(2)) and b["total"] == pytest.approx(math.sqrt(8))


def test_cosine_similarity(models):
    base, m = models
    cos = cosine_similarity_matrix(base, [m["a"], m["b"], m["c"]])
    # a.b = -1 + 4 - 1 = 2; a.c = -3 + 4 = 1; b.c = -1; |a|^2=31, |b|^2=8, |c|^2=3
    expected = torch.tensor(
        [
            [1.0, 2 / math.sqrt(31 * 8), 1 / math.sqrt(31 * 3)],
            [2 / math.sqrt(31 * 8), 1.0, -1 / math.sqrt(8 * 3)],
            [1 / math.sqrt(31 * 3), -1 / math.sqrt(8 * 3), 1.0],
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(cos, expected, atol=1e-12)


def test_zero_task_vector_has_zero_similarity(models):
    base, m = models
    cos = cosine_similarity_matrix(base, [base, m["a"]])
    assert cos[0].tolist() == [0.0, 0.0] and cos[1, 1] == pytest.approx(1.0)


def test_sign_conflicts(models):
    base, m = models
    two = sign_conflicts_by_layer(base, [m["a"], m["b"]])
    # layer 0: (1,-1) and (-1,1) clash, (2,2) and (0,0) do not -> 2/4; layer 1 none; other none
    assert two == {"layer 0": 0.5, "layer 1": 0.0, "other": 0.0, "total": 2 / 9}
    three = sign_conflicts_by_layer(base, [m["a"], m["b"], m["c"]])
    # layer 1: (3,0,-1) clashes; other: (0,1,0) vs (0,1,-1): the second clashes
    assert three == {"layer 0": 0.5, "layer 1": 1 / 3, "other": 0.5, "total": 4 / 9}


def test_block_streaming_gives_the_same_answers(tmp_path):
    base, fts = make_family(tmp_path / "fam", n_models=3)
    whole = (
        task_vector_norms(base, fts),
        cosine_similarity_matrix(base, fts),
        sign_conflicts_by_layer(base, fts),
    )
    blocks = (
        task_vector_norms(base, fts, block_elements=100),
        cosine_similarity_matrix(base, fts, block_elements=100),
        sign_conflicts_by_layer(base, fts, block_elements=100),
    )
    for ref in whole[0]:
        for group, value in whole[0][ref].items():
            assert blocks[0][ref][group] == pytest.approx(value, rel=1e-9)
    assert torch.allclose(whole[1], blocks[1], atol=1e-12)
    assert whole[2] == blocks[2]
    assert list(whole[2]) == ["layer 0", "layer 1", "layer 2", "other", "total"]
    # the perturbations are independent noise, so their task vectors are near-orthogonal
    off_diag = whole[1][~torch.eye(3, dtype=torch.bool)]
    assert off_diag.abs().max() < 0.2


def test_checkpoints_and_errors(models, tmp_path):
    base, m = models
    ckpts = [Checkpoint.open(m["a"]), Checkpoint.open(m["b"])]
    assert sign_conflicts_by_layer(Checkpoint.open(base), ckpts)["layer 0"] == 0.5
    with pytest.raises(ValueError, match="two"):
        sign_conflicts_by_layer(base, [m["a"]])
    with pytest.raises(ValueError, match="at least one"):
        task_vector_norms(base, [])
    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(MergeError):
        task_vector_norms(base, [tmp_path / "odd.safetensors"])
