"""End to end through the CLI: fine-tune the packaged MiniLM on a 3-class task and evaluate."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from click.testing import CliRunner  # noqa: E402

from weightsmith.finetune.cli import eval_cmd, finetune_cmd  # noqa: E402

TOPICS = {
    0: ["football", "the tennis final", "the goalkeeper", "a marathon", "the referee"],
    1: ["pasta", "the new bakery", "spicy soup", "the chef", "chocolate cake"],
    2: ["heavy rain", "the forecast", "a thunderstorm", "snowfall", "the heatwave"],
}
TEMPLATES = [
    "we talked about {} all evening.",
    "the article was mostly about {}.",
    "everyone at work kept mentioning {}.",
    "my brother sent me a long message about {}.",
    "i could not stop thinking about {}.",
]


def make_rows(n: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 3
        rows.append({"text": rng.choice(TEMPLATES).format(rng.choice(TOPICS[label])),
                     "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from weightsmith.testbeds.paths import minilm_dir

    root = tmp_path_factory.mktemp("minilm")
    train = write_jsonl(root / "train.jsonl", make_rows(240, seed=1))
    test = write_jsonl(root / "test.jsonl", make_rows(90, seed=2))
    out = root / "ft"
    result = CliRunner().invoke(
        finetune_cmd,
        [str(minilm_dir()), str(out), "--data", str(train), "--task", "classification",
         "--steps", "20", "--lr", "1e-4", "--warmup-steps", "3", "--batch-size", "16",
         "--max-length", "32", "--freeze", "word_embeddings", "--seed", "0", "--threads", "1",
         "--quiet"],
    )
    assert result.exit_code == 0, result.output
    assert "20 steps" in result.stdout
    return out, test


def test_heldout_accuracy_via_eval_cli(finetuned: tuple[Path, Path]) -> None:
    out, test = finetuned
    result = CliRunner().invoke(
        eval_cmd, [str(out), "--data", str(test), "--task", "classification", "--json"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 90
    assert metrics["accuracy"] >= 0.9
    assert 0.0 <= metrics["ece"] <= 1.0 and metrics["loss"] > 0.0
    # stderr is not a terminal here: progress comes as plain lines, never tqdm's \r frames
    assert "eval: 100% (90 of 90 examples)" in result.stderr and "\r" not in result.stderr

    text = CliRunner().invoke(eval_cmd, [str(out), "--data", str(test), "--task",
                                         "classification", "--quiet"])
    assert text.exit_code == 0 and "accuracy" in text.stdout and text.stderr == ""


def test_output_loads_in_transformers(finetuned: tuple[Path, Path]) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, test = finetuned
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_log.json"} <= {
        p.name for p in out.iterdir()
    }
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 3
    assert model.config.architectures == ["BertForSequenceClassification"]
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    with torch.no_grad():
        enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
        predicted = model(**enc).logits.argmax(dim=-1).tolist()
    accuracy = sum(p == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows)
    assert accuracy >= 0.9

    log = json.loads((out / "train_log.json").read_text())
    assert log["new_head"] is True and log["num_labels"] == 3
    assert len(log["steps"]) == 20 and log["options"]["threads"] == 1
    assert log["options"]["freeze"] == ["word_embeddings"]
    assert log["steps"][-1]["loss"] < log["steps"][0]["loss"]


def test_missing_transformers_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from weightsmith.testbeds.paths import minilm_dir

    data = write_jsonl(tmp_path / "train.jsonl", make_rows(6, seed=0))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    result = CliRunner().invoke(
        finetune_cmd, [str(minilm_dir()), str(tmp_path / "out"), "--data", str(data),
                       "--task", "classification", "--quiet"],
    )
    assert result.exit_code == 7
    assert "pip install 'weightsmith[train]'" in result.stderr
    assert "Traceback" not in result.output
