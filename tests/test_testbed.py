"""Testbeds: generators and caching (fast), full builds (slow, marked)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from click.testing import CliRunner  # noqa: E402

from weightsmith.finetune.cli import testbed_cmd as cli_testbed  # noqa: E402
from weightsmith.testbeds import build  # noqa: E402
from weightsmith.testbeds import seq_tasks as st  # noqa: E402
from weightsmith.testbeds import text_tasks as tt  # noqa: E402
from weightsmith.testbeds.common import cached_info, recipe_hash, write_info  # noqa: E402


def test_text_tasks_are_deterministic_balanced_and_shifted() -> None:
    for task in tt.TASKS.values():
        rows = tt.generate(task, 400, seed=1)
        assert rows == tt.generate(task, 400, seed=1)
        assert rows != tt.generate(task, 400, seed=2)
        counts = [sum(r["label"] == k for r in rows) for k in range(len(task.labels))]
        assert min(counts) > 400 / len(task.labels) * 0.7, (task.name, counts)
        ood = tt.generate(task, 400, seed=1, ood=True)
        assert not {r["text"] for r in rows} & {r["text"] for r in ood}, task.name
    # Shifted sentiment uses adjectives never seen in training.
    ood_words = {w for r in tt.generate(tt.TASKS["sentiment"], 200, 3, ood=True)
                 for w in str(r["text"]).split()}
    assert not ood_words & set(tt._SENT[False]["pos"] + tt._SENT[False]["neg"])


def test_sentiment_negation_flips_label() -> None:
    for row in tt.generate(tt.TASKS["sentiment"], 300, seed=4):
        text = str(row["text"])
        positive = any(f" {a}" in text for a in tt._SENT[False]["pos"])
        negated = any(f" {n} " in text for n in tt._SENT[False]["negators"])
        assert row["label"] == int(positive != negated), text


def test_sequence_tasks_compute_the_right_answers() -> None:
    for row in st.sample(st.sort, 50, seed=1):
        s = row["prompt"][len("<sort>"):-1]
        assert row["response"] == "".join(sorted(s))
    for row in st.sample(st.mod7, 50, seed=2) + st.sample(st.mod7, 50, seed=2, ood=True):
        a, b = row["prompt"][len("<mod7>"):-1].split("+")
        assert row["response"] == str((int(a) + int(b)) % 7)
    for row in st.sample(st.lookup, 50, seed=3):
        table, key = row["prompt"][len("<kv>"):-1].split(":")
        assert dict((p[0], p[1]) for p in table.split(";"))[key] == row["response"]
    refusals = [r for r in st.sample(st.refuse, 200, seed=4) if r["response"] == "<refuse>"]
    assert 60 < len(refusals) < 140 and all("!" in r["prompt"] for r in refusals)
    mix = st.mixture(st.PRETRAIN_TASKS, 50, seed=0)
    assert {r["prompt"].split(">")[0] + ">" for r in mix} == {"<copy>", "<rev>", "<sort>",
                                                               "<add>", "<kv>"}


def test_char_tokenizer_round_trip(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from weightsmith.testbeds.char_tokenizer import save_char_tokenizer

    save_char_tokenizer(tmp_path, st.ALPHABET, st.MARKERS)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "<revsep>a,b,c=c,b,a<refuse>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 + 5 + 1 + 5 + 1  # markers are single tokens, the rest one per char
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_recipe_cache(tmp_path: Path) -> None:
    recipe = {"testbed": "x", "steps": 3}
    digest = recipe_hash(recipe)
    assert digest == recipe_hash({"steps": 3, "testbed": "x"})  # key order is irrelevant
    assert digest != recipe_hash({"testbed": "x", "steps": 4})
    assert cached_info(tmp_path, digest) is None
    write_info(tmp_path, {"recipe_hash": digest, "tasks": {}})
    assert cached_info(tmp_path, digest) == {"recipe_hash": digest, "tasks": {}}
    assert cached_info(tmp_path, recipe_hash({"other": 1})) is None


def check_family(out: Path, info: dict, margin: float) -> None:
    from transformers import AutoConfig

    recorded = json.loads((out / "testbed.json").read_text())
    assert recorded["recipe_hash"] == info["recipe_hash"]
    assert recorded["versions"]["torch"] and recorded["recipe"]["seed"] == 0
    assert len(info["tasks"]) >= 4
    for name, result in info["tasks"].items():
        assert result["finetuned"] >= result["base"] + margin, (name, result)
        model_dir = out / result["model"]
        assert AutoConfig.from_pretrained(model_dir) is not None
        for split in ("train", "val", "test", "test_ood"):
            assert (out / "data" / name / f"{split}.jsonl").stat().st_size > 0


# The full builds take minutes, so they are kept between test runs, in a folder named by
# everything that determines their bytes: the testbed's recipe hash covers its settings and
# the torch/transformers versions, the source digest the code that trains and evaluates. Builds
# are deterministic, so a kept build is the build this code would make now; any change to
# weightsmith/ (or the recipe) names a new folder and the test builds again. A fresh clone, as
# in CI, always builds. WEIGHTSMITH_TEST_CACHE moves the folder; delete it to force a build.
TEST_CACHE = Path(os.environ.get("WEIGHTSMITH_TEST_CACHE",
                                 Path(__file__).resolve().parent.parent / ".cache" / "tests"))


def source_digest() -> str:
    import weightsmith

    package = Path(weightsmith.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def kept_build(name: str) -> tuple[Path, dict]:
    """Build testbed ``name`` into the test cache, or reuse the build kept there."""
    from weightsmith.testbeds import minilm, tinylm

    recipe = {"minilm": minilm, "tinylm": tinylm}[name].recipe()
    out = TEST_CACHE / f"testbed-{name}-{recipe_hash(recipe)}-{source_digest()}"
    for stale in TEST_CACHE.glob(f"testbed-{name}-*"):
        if stale != out:
            shutil.rmtree(stale)  # built by other code or settings: never reused, so not kept
    return out, build(name, out, quiet=True)


def file_times(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_build_tinylm() -> None:
    out, info = kept_build("tinylm")
    assert set(info["stage_seconds"]) >= {"data", "init", "pretrain base", "pretrain base-v2"}
    check_family(out, info, margin=0.3)
    for task, scores in info["pretraining"].items():
        assert scores["base"] > scores["init"] + 0.3, task
    assert (out / "base-v2" / "model.safetensors").is_file()
    # Same recipe: a cache hit that does no work (no file rewritten), reported through the CLI.
    before = file_times(out)
    result = CliRunner().invoke(cli_testbed, ["tinylm", str(out)])
    assert result.exit_code == 0, result.output
    assert "cached" in result.stdout and "mod7" in result.stdout
    assert file_times(out) == before


@pytest.mark.slow
def test_build_minilm() -> None:
    out, info = kept_build("minilm")
    check_family(out, info, margin=0.1)
    before = file_times(out)
    assert build("minilm", out)["cached"] is True
    assert file_times(out) == before
