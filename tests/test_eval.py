"""``evaluate`` agrees with hand-written transformers loops on the same data."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from weightsmith.finetune import evaluate, finetune  # noqa: E402
from weightsmith.finetune.metrics import expected_calibration_error  # noqa: E402
from weightsmith.testbeds.tiny import make_tiny_bert, make_tiny_llama  # noqa: E402


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def copy_rows(n: int, seed: int, corrupt_every: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s = "".join(rng.choice("abcd") for _ in range(rng.randint(1, 3)))
        wrong = corrupt_every and i % corrupt_every == 0
        rows.append({"prompt": f"<copy>{s}=", "response": s[::-1] + "a" if wrong else s})
    return rows


@pytest.fixture(scope="module")
def copier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama trained for a few seconds to copy short strings (most of them right)."""
    root = tmp_path_factory.mktemp("copier")
    base = make_tiny_llama(root / "init", seed=0)
    train = write_jsonl(root / "train.jsonl", copy_rows(400, seed=1))
    finetune(base, root / "ft", train, "causal-lm", steps=150, lr=1e-2, warmup_steps=10,
             batch_size=32, quiet=True, max_length=16, threads=1)
    return root / "ft"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "m", num_labels=3, seed=1)


def numpy_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.mean() * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
    return float(total)


def test_classification_matches_hand_loop(tmp_path: Path, classifier: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "violin", "tiger", "lamp"]
    rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 9))),
             "label": rng.randrange(3)} for _ in range(37)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    metrics = evaluate(classifier, data, "classification", batch_size=8)

    model = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(classifier)
    probs, losses = [], []
    with torch.no_grad():
        for row in rows:  # one example at a time: no padding involved
            logits = model(**tokenizer(row["text"], return_tensors="pt")).logits[0]
            probs.append(logits.softmax(-1).numpy())
            losses.append(-logits.log_softmax(-1)[row["label"]].item())
    p, y = np.stack(probs), np.array([r["label"] for r in rows])
    assert metrics["n"] == 37
    assert metrics["accuracy"] == pytest.approx(float((p.argmax(1) == y).mean()), abs=1e-12)
    assert metrics["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-5)
    assert metrics["ece"] == pytest.approx(numpy_ece(p, y), abs=1e-5)


def test_ece_known_values() -> None:
    # Two examples at confidence 0.9 (one right) and one at 0.6 (right): bins differ.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1])
    expected = 2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1.0 - 0.6)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    assert expected_calibration_error(torch.eye(3), torch.arange(3)) == 0.0


def hand_greedy(model, tokenizer, prompt: str, n_new: int) -> list[int]:
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = len(ids)
    with torch.no_grad():
        for _ in range(n_new):  # no KV cache, no generate(): the plainest greedy loop
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[start:]


def test_causal_lm_matches_hand_loop(tmp_path: Path, copier: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = copy_rows(40, seed=9, corrupt_every=4)  # every 4th response is wrong on purpose
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    metrics = evaluate(copier, data, "causal-lm", batch_size=6)

    model = AutoModelForCausalLM.from_pretrained(copier).eval()
    tokenizer = AutoTokenizer.from_pretrained(copier)
    hits, loss_sum, tokens = 0, 0.0, 0
    for row in rows:
        prompt = [tokenizer.bos_token_id] + tokenizer(row["prompt"],
                                                      add_special_tokens=False)["input_ids"]
        target = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        target = target + [tokenizer.eos_token_id]
        hits += hand_greedy(model, tokenizer, row["prompt"], len(target)) == target
        with torch.no_grad():
            logits = model(torch.tensor([prompt + target])).logits[0]
        logp = logits.log_softmax(-1)
        for i, tok in enumerate(target):
            loss_sum -= logp[len(prompt) - 1 + i, tok].item()
        tokens += len(target)
    assert 0 < hits < len(rows), "the copier should get some but not all rows right"
    assert metrics["exact_match"] == hits / len(rows)
    assert metrics["tokens"] == tokens
    assert metrics["loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)


def test_evaluate_is_deterministic(tmp_path: Path, copier: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", copy_rows(20, seed=4, corrupt_every=3))
    assert evaluate(copier, data, "causal-lm") == evaluate(copier, data, "causal-lm")


def test_evaluate_requires_a_head(tmp_path: Path) -> None:
    from weightsmith.errors import CheckpointError

    bare = make_tiny_bert(tmp_path / "bare")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": 0},
                                              {"text": "y", "label": 1}])
    with pytest.raises(CheckpointError, match="no sequence-classification head"):
        evaluate(bare, data, "classification")
