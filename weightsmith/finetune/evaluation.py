"""Batched, deterministic evaluation: ``evaluate(model_dir, data, task) -> dict``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from weightsmith.finetune._deps import require_transformers
from weightsmith.finetune.data import Dataset, check_label_range, check_task, load_jsonl
from weightsmith.finetune.encoding import Features, batches, collate, encode, pad_id
from weightsmith.finetune.losses import classification_logits, lm_token_losses
from weightsmith.finetune.metrics import expected_calibration_error
from weightsmith.finetune.modeling import LoadedModel, load_model
from weightsmith.progress import progress

# Called with the number of examples just scored (a progress reporter's update).
Advance = Callable[[int], object]


def _skip(n: int) -> None:
    return None


@torch.no_grad()
def evaluate_classification(
    model: torch.nn.Module,
    features: Sequence[Features],
    pad: int,
    batch_size: int,
    advance: Advance = _skip,
) -> dict[str, float]:
    probs, labels, loss_sum = [], [], 0.0
    for chunk in batches(features, batch_size):
        batch = collate(chunk, pad)
        logits = classification_logits(model, batch)
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        probs.append(logits.softmax(dim=-1))
        labels.append(batch["labels"])
        advance(len(chunk))
    p, y = torch.cat(probs), torch.cat(labels)
    return {
        "accuracy": (p.argmax(dim=1) == y).double().mean().item(),
        "loss": loss_sum / len(y),
        "ece": expected_calibration_error(p, y),
        "n": len(y),
    }


@torch.no_grad()
def _greedy_matches(
    model: torch.nn.Module,
    features: Sequence[Features],
    pad: int,
    eos: int | None,
    batch_size: int,
    advance: Advance = _skip,
) -> int:
    """Count examples whose greedy continuation reproduces the response (and its EOS).

    Prompts are grouped by length so no batch needs padding: left padding would require every
    architecture to derive position ids from the attention mask, and not all do.
    """
    transformers = require_transformers()
    groups: dict[int, list[Features]] = {}
    for f in features:
        groups.setdefault(f.prompt_len, []).append(f)
    hits = 0
    for prompt_len in sorted(groups):
        for chunk in batches(groups[prompt_len], batch_size):
            targets = [f.input_ids[prompt_len:] for f in chunk]
            width = max(len(t) for t in targets)
            if width == 0:
                hits += len(chunk)
                advance(len(chunk))
                continue
            prompts = torch.tensor([f.input_ids[:prompt_len] for f in chunk], dtype=torch.long)
            config = transformers.GenerationConfig(
                do_sample=False,
                num_beams=1,
                max_new_tokens=width,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            out = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                generation_config=config,
            )
            generated = out[:, prompt_len:].tolist()
            hits += sum(g[: len(t)] == t for g, t in zip(generated, targets, strict=True))
            advance(len(chunk))
    return hits


@torch.no_grad()
def evaluate_causal_lm(
    model: torch.nn.Module,
    tokenizer,
    features: Sequence[Features],
    batch_size: int,
    exact_match: bool = True,
    advance: Advance = _skip,
) -> dict[str, float]:
    """``advance`` hears of every example twice when ``exact_match`` (loss pass, then greedy)."""
    pad = pad_id(tokenizer)
    total, count = 0.0, 0
    for chunk in batches(features, batch_size):
        s, c = lm_token_losses(model, collate(chunk, pad))
        total += s.item()
        count += int(c)
        advance(len(chunk))
    out: dict[str, float] = {"loss": total / max(count, 1), "tokens": count, "n": len(features)}
    if exact_match:
        hits = _greedy_matches(model, features, pad, tokenizer.eos_token_id, batch_size, advance)
        out["exact_match"] = hits / len(features)
    return out


def evaluate_features(
    loaded: LoadedModel,
    task: str,
    features: Sequence[Features],
    batch_size: int,
    exact_match: bool = True,
    advance: Advance = _skip,
) -> dict[str, float]:
    model = loaded.model
    was_training = model.training
    model.eval()  # dropout off: evaluation must be a pure function of the weights
    try:
        if task == "classification":
            return evaluate_classification(
                model, features, pad_id(loaded.tokenizer), batch_size, advance
            )
        return evaluate_causal_lm(model, loaded.tokenizer, features, batch_size, exact_match, advance)
    finally:
        model.train(was_training)


def prepare(
    model_dir: str | Path,
    data: str | Path | Dataset,
    task: str,
    max_length: int,
    truncate: bool,
    require_head: bool = True,
    seed: int = 0,
) -> tuple[LoadedModel, Dataset]:
    """Load model and data for scoring; labels are checked against the model's head."""
    check_task(task)
    dataset = data if isinstance(data, Dataset) else load_jsonl(data, task)
    num_labels = dataset.num_labels if task == "classification" else None
    loaded = load_model(model_dir, task, num_labels=num_labels, seed=seed, require_head=require_head)
    if task == "classification":
        check_label_range(dataset, loaded.model.config.num_labels)
    return loaded, dataset


def evaluate(
    model_dir: str | Path,
    data: str | Path | Dataset,
    task: str,
    batch_size: int = 32,
    max_length: int = 512,
    truncate: bool = False,
    exact_match: bool = True,
    show_progress: bool = False,
) -> dict[str, float]:
    """Score a fine-tuned folder on a JSONL file.

    classification -> accuracy, loss (mean cross-entropy), ece (15 equal-width bins), n.
    causal-lm -> loss (mean over response tokens incl. EOS), exact_match (greedy decoding
    reproduces the response), tokens, n.
    ``show_progress`` reports examples scored on stderr (``weightsmith.progress``).
    """
    loaded, dataset = prepare(model_dir, data, task, max_length, truncate)
    features = encode(dataset, loaded.tokenizer, max_length, truncate)
    passes = 2 if task == "causal-lm" and exact_match else 1  # loss, then greedy decoding
    bar = progress(len(features) * passes, "eval", "example", enabled=show_progress)
    try:
        return evaluate_features(loaded, task, features, batch_size, exact_match, bar.update)
    finally:
        bar.close()
