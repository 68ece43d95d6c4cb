"""Tokenizer merges: ``tokenizer_source`` and the ``tokenizer:`` block build the output
vocabulary, every input's embedding and LM-head rows are gathered to it, then merged.

The family (tests/tokenizer_family.py): a base with a 64-token vocabulary and two fine-tunes
that each added tokens of their own (``<both>`` added by both, at different ids). Values are
compared with mergekit 0.1.5's goldens (tests/data/parity/tokenizer/, written by
benchmarks/parity/make_tokenizer_golden.py) token by token: mergekit orders a union's new tokens
by a Python set of models, so only the token -> row relation is stable (docs/mergekit.md). Set
WEIGHTSMITH_MERGEKIT=/path/to/mergekit-yaml to also run mergekit live.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from models import load_folder
from safetensors.torch import load_file
from tokenizer_family import make_family
from transformers import AutoTokenizer

import weightsmith
from weightsmith.engine.tasks import Source
from weightsmith.engine.vocab_rows import RowGather, TaskFills, read_gathered
from weightsmith.errors import RecipeError
from weightsmith.io.checkpoint import Checkpoint

DATA = Path(__file__).parent / "data" / "parity" / "tokenizer"
RECIPES = sorted(DATA.glob("*.yaml"))
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("tokfam"))


def recipe_text(path: Path, root: Path) -> str:
    return path.read_text().replace("{root}", str(root))


def merge(tmp_path: Path, text: str, name: str = "out", **kw: object) -> Path:
    (tmp_path / f"{name}.yaml").write_text(text)
    out = tmp_path / name
    weightsmith.merge(tmp_path / f"{name}.yaml", out, fsync=False, **kw)
    return out


def rows_by_token(folder: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    return AutoTokenizer.from_pretrained(str(folder)).get_vocab(), load_folder(folder)


def test_union_of_two_fine_tunes_takes_each_new_token_from_its_model(family, tmp_path):
    text = recipe_text(DATA / "union-task-arithmetic.yaml", family["base"].parent)
    out = merge(tmp_path, text)
    vocab, state = rows_by_token(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(vocab) == 64 + 6 and json.loads((out / "config.json").read_text())["vocab_size"] == 70
    ids = tok("w5 alpha beta <|a_start|> <|b_tool|> <both>", add_special_tokens=False)["input_ids"]
    assert ids == [vocab[t] for t in ("w5", "alpha", "beta", "<|a_start|>", "<|b_tool|>", "<both>")]
    inputs = {
        n: (AutoTokenizer.from_pretrained(str(p)).get_vocab(), load_folder(p)) for n, p in family.items()
    }
    for name in VOCAB_TENSORS:
        # A token only one model has: every input gets that model's row, so the merge is it.
        for token, donor in (
            ("<|a_start|>", "ft_a"),
            ("alpha", "ft_a"),
            ("<|b_tool|>", "ft_b"),
            ("gamma", "ft_b"),
        ):
            donor_vocab, donor_state = inputs[donor]
            assert torch.equal(state[name][vocab[token]], donor_state[name][donor_vocab[token]]), (
                name,
                token,
            )
        # <both>: the two fine-tunes have it (at different ids), the base does not: their mean.
        mean = (
            inputs["ft_a"][1][name][inputs["ft_a"][0]["<both>"]]
            + inputs["ft_b"][1][name][inputs["ft_b"][0]["<both>"]]
        ) / 2
        torch.testing.assert_close(state[name][vocab["<both>"]], mean, rtol=0, atol=1e-7)
        # A shared token: task arithmetic of the three models' own rows.
        b, a, c = (inputs[n][1][name][7] for n in ("base", "ft_a", "ft_b"))
        torch.testing.assert_close(state[name][7], b + 0.5 * (a - b) + 0.5 * (c - b), rtol=0, atol=1e-6)


def test_token_rules_force_zero_model_token_and_padding(family, tmp_path):
    text = recipe_text(DATA / "block-rules-ties.yaml", family["base"].parent)
    # forced to zero in every input (unforced, ft_a would keep its own row of alpha)
    out = merge(tmp_path, text.replace("source: {kind: zero}", "source: {kind: zero}\n      force: true"))
    vocab, state = rows_by_token(out)
    a_vocab, a_state = (
        AutoTokenizer.from_pretrained(str(family["ft_a"])).get_vocab(),
        load_folder(family["ft_a"]),
    )
    b_vocab, b_state = (
        AutoTokenizer.from_pretrained(str(family["ft_b"])).get_vocab(),
        load_folder(family["ft_b"]),
    )
    assert len(vocab) == 70 and json.loads((out / "config.json").read_text())["vocab_size"] == 72
    for name in VOCAB_TENSORS:
        m = state[name]
        assert m.shape[0] == 72
        assert torch.equal(m[vocab["<both>"]], b_state[name][b_vocab["<both>"]])  # forced from ft_b
        assert torch.equal(m[vocab["w5"]], a_state[name][a_vocab["w9"]])  # forced: ft_a's row of w9
        assert not m[vocab["alpha"]].any()  # zero
    # The padding rows of each input are the mean of its aligned rows; identical inputs there,
    # so the merged padding rows equal each other.
    assert torch.equal(state["lm_head.weight"][70], state["lm_head.weight"][71])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_matches_mergekit_golden(recipe, family, tmp_path):
    hashes = json.loads((DATA / "golden" / "inputs.json").read_text())
    for name, folder in family.items():
        assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == hashes[name], name
    out = merge(tmp_path, recipe_text(recipe, family["base"].parent))
    vocab, state = rows_by_token(out)
    gold_vocab = json.loads((DATA / "golden" / f"{recipe.stem}.vocab.json").read_text())
    gold = load_file(str(DATA / "golden" / f"{recipe.stem}.safetensors"))
    assert set(vocab) == set(gold_vocab)
    compare_by_token(state, vocab, gold, gold_vocab)


def compare_by_token(state, vocab, gold, gold_vocab) -> None:
    ours = torch.tensor([vocab[t] for t in gold_vocab])
    theirs = torch.tensor(list(gold_vocab.values()))
    n = len(gold_vocab)
    for name in VOCAB_TENSORS:
        assert state[name].shape == gold[name].shape, name
        torch.testing.assert_close(state[name][ours], gold[name][theirs], rtol=0, atol=1e-6)
        torch.testing.assert_close(state[name][n:], gold[name][n:], rtol=0, atol=1e-6)  # padding rows


@pytest.mark.skipif(
    not os.environ.get("WEIGHTSMITH_MERGEKIT"), reason="set WEIGHTSMITH_MERGEKIT to run mergekit live"
)
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_matches_mergekit_live(recipe, family, tmp_path):
    text = recipe_text(recipe, family["base"].parent)
    out = merge(tmp_path, text)
    (tmp_path / "mk.yaml").write_text(text)
    subprocess.run(
        [os.environ["WEIGHTSMITH_MERGEKIT"], str(tmp_path / "mk.yaml"), str(tmp_path / "mk")],
        check=True,
        capture_output=True,
    )
    vocab, state = rows_by_token(out)
    gold_vocab, gold = rows_by_token(tmp_path / "mk")
    assert set(vocab) == set(gold_vocab)
    compare_by_token(state, vocab, gold, gold_vocab)
    for name, tensor in state.items():  # every other tensor as in any merge
        if name not in VOCAB_TENSORS:
            torch.testing.assert_close(tensor, gold[name], rtol=0, atol=1e-6)


def test_row_blocks_give_the_same_merge(family, tmp_path):
    """A budget that splits the vocabulary tensors into row blocks (each block gathering its
    rows by index) writes the same bytes as a whole-tensor run."""
    text = recipe_text(DATA / "block-rules-ties.yaml", family["base"].parent).replace(
        "ties", "task_arithmetic"
    )
    text = text.replace("density: 0.6", "density: 1.0")
    whole = load_folder(merge(tmp_path, text, "whole"))
    plan = weightsmith.plan_merge(tmp_path / "whole.yaml", memory_budget="40KB")
    blocks = [u for u in plan.units if u.task.name == "lm_head.weight"]
    assert len(blocks) > 3 and all(u.rows for u in blocks)
    split = load_folder(merge(tmp_path, text, "split", memory_budget="40KB"))
    for name in VOCAB_TENSORS:
        assert torch.equal(whole[name], split[name]), name


def test_gather_reads_rows_by_index(family):
    """read_gathered: runs of consecutive input rows, fills, in any order."""
    ckpt = Checkpoint.open(str(family["ft_b"]))
    full = ckpt.read("lm_head.weight").float()
    src = Source(0, "lm_head.weight")
    fills = TaskFills([((src, 3), (src, 5)), ()], vocab_len=6)
    gather = RowGather((10, 11, 12, -1, 2, -2, 0), fills)
    dest = torch.empty(7, full.shape[1])
    read_gathered([ckpt], Source(0, "lm_head.weight", gather=gather), (0, 7), dest, None)
    assert (
        torch.equal(dest[:3], full[10:13]) and torch.equal(dest[4], full[2]) and torch.equal(dest[6], full[0])
    )
    torch.testing.assert_close(dest[3], (full[3] + full[5]) / 2)
    assert not dest[5].any()
    part = torch.empty(3, full.shape[1])
    read_gathered([ckpt], Source(0, "lm_head.weight", gather=gather), (2, 5), part, None)
    assert torch.equal(part, dest[2:5])


def test_token_rule_naming_a_model_without_the_token_is_refused(family, tmp_path):
    text = recipe_text(DATA / "block-rules-ties.yaml", family["base"].parent).replace(
        "    w7:", '    "<new>":'
    )
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"tokenizer.tokens\['<new>'\].*has no token"):
        weightsmith.plan_merge(tmp_path / "r.yaml")


def test_model_prefix_spelling_is_read_with_a_warning(family, tmp_path, capsys):
    text = recipe_text(DATA / "base-source-linear.yaml", family["base"].parent)
    text = text.replace("tokenizer:\n  source: base", f"tokenizer_source: model:{family['ft_b']}")
    out = merge(tmp_path, text)
    assert "old spelling" in capsys.readouterr().err
    assert (
        AutoTokenizer.from_pretrained(str(out)).get_vocab()
        == AutoTokenizer.from_pretrained(str(family["ft_b"])).get_vocab()
    )


def test_plan_repr_is_the_same_every_run(family, tmp_path):
    """The resume journal fingerprints the tasks' reprs: row gathers print a digest of their
    maps, never object addresses or cached rows."""
    (tmp_path / "r.yaml").write_text(recipe_text(DATA / "block-rules-ties.yaml", family["base"].parent))
    one, two = (weightsmith.plan_merge(tmp_path / "r.yaml") for _ in range(2))
    head = next(t for t in one.tasks if t.name == "lm_head.weight")
    assert "RowGather(rows=72, sha256=" in repr(head) and " at 0x" not in repr(head)
    assert [repr(t) for t in one.tasks] == [repr(t) for t in two.tasks]


def test_a_sliced_recipe_gets_the_row_gathers(family):
    """A passthrough stack plans its vocabulary tensors through the same alignment."""
    plan = weightsmith.plan_merge(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(family["ft_a"]), "layer_range": [0, 1]}]},
                {"sources": [{"model": str(family["ft_a"]), "layer_range": [0, 2]}]},
            ],
            "dtype": "float32",
            "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
        }
    )
    vocab_tasks = [t for t in plan.tasks if t.name in VOCAB_TENSORS]
    assert len(vocab_tasks) == 2
    for task in vocab_tasks:
        assert task.shape == (72, 16) and task.models[0].gather is not None
        assert task.models[0].gather.rows[:67] == tuple(range(67))  # its own rows, then padding
