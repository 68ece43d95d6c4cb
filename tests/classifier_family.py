"""A tiny classifier family and its data, for tests that score merges (test_search.py,
test_soup.py): JSONL files, noisy copies with a negated head, random sentences labelled by a
model's own predictions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WORDS = ["apple", "river", "stone", "cloud", "violin", "tiger", "lamp", "zebra"]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def noisy_copy(good: Path, folder: Path, scale: float, generator: torch.Generator) -> Path:
    """``good``'s folder with noise (``scale`` x each tensor's std) on every float tensor of
    more than one element and the classifier head negated: with two classes its predictions
    flip. Draws from ``generator``, so copies made in turn from one generator differ."""
    state = load_file(str(good / "model.safetensors"))
    noisy = {k: v + scale * torch.randn(v.shape, generator=generator) * v.std() if v.is_floating_point()
             and v.numel() > 1 else v.clone() for k, v in state.items()}
    for k in ("classifier.weight", "classifier.bias"):
        noisy[k] = -state[k]
    folder.mkdir()
    for f in good.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    save_file(noisy, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def random_sentences(n: int, seed: int = 0) -> list[dict[str, object]]:
    """``n`` rows of 2 to 8 random words, all labelled 0 (to be relabelled by a model)."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))), "label": 0}
            for _ in range(n)]


def labelled_by(model: Path, rows: list[dict[str, object]], draft: Path) -> list[dict[str, object]]:
    """``rows`` with each label replaced by ``model``'s prediction (``draft``: where the rows are
    written for the evaluator to read)."""
    from weightsmith.finetune import Evaluator
    from weightsmith.finetune.encoding import collate, pad_id

    ev = Evaluator(model, write_jsonl(draft, rows), "classification")
    ev.model.eval()
    with torch.no_grad():
        batch = collate(ev.features, pad_id(ev.loaded.tokenizer))
        preds = ev.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
    return [{**r, "label": int(p)} for r, p in zip(rows, preds, strict=True)]
