"""Turning validated examples into token ids, and padding them into batches.

Prompt and response are tokenized separately and concatenated, so the loss mask falls exactly on
the response tokens and greedy decoding can be compared token-for-token with the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from weightsmith.errors import DataError
from weightsmith.finetune.data import Dataset

IGNORE_INDEX = -100  # the value torch's cross_entropy skips


@dataclass(frozen=True)
class Features:
    """Token ids for one example; ``labels`` is the class id or the per-token targets."""

    line: int
    input_ids: list[int]
    token_type_ids: list[int] | None
    label: int | None = None
    labels: list[int] | None = None
    prompt_len: int = 0  # causal-lm: tokens before the response (including BOS)


def pad_id(tokenizer) -> int:
    """Padding id; decoder-only tokenizers often lack one and any id works under the mask."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # unreachable, keeps type checkers happy


def _too_long(data: Dataset, line: int, n: int, max_length: int) -> DataError:
    return DataError(
        f"{data.where(line)}: example is {n} tokens, longer than max_length={max_length}; "
        "shorten it, raise --max-length, or pass --truncate"
    )


def encode_classification(data: Dataset, tokenizer, max_length: int, truncate: bool) -> list[Features]:
    out = []
    for ex in data.examples:
        enc = tokenizer(ex.text, ex.text_pair, add_special_tokens=True, truncation=False)
        ids = list(enc["input_ids"])
        types = list(enc["token_type_ids"]) if "token_type_ids" in enc else None
        if len(ids) > max_length:
            if not truncate:
                raise _too_long(data, ex.line, len(ids), max_length)
            enc = tokenizer(
                ex.text,
                ex.text_pair,
                add_special_tokens=True,
                truncation=True,
                max_length=max_length,
            )
            ids = list(enc["input_ids"])
            types = list(enc["token_type_ids"]) if "token_type_ids" in enc else None
        out.append(Features(line=ex.line, input_ids=ids, token_type_ids=types, label=ex.label))
    return out


def encode_causal_lm(data: Dataset, tokenizer, max_length: int, truncate: bool) -> list[Features]:
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    out = []
    for ex in data.examples:
        prompt = ([bos] if bos is not None else []) + list(
            tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        )
        response = list(tokenizer(ex.response, add_special_tokens=False)["input_ids"])
        if eos is not None:
            response.append(eos)
        ids = prompt + response
        if len(ids) > max_length:
            if not truncate:
                raise _too_long(data, ex.line, len(ids), max_length)
            ids = ids[:max_length]  # keep the prompt, drop the end of the response
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
        out.append(
            Features(
                line=ex.line,
                input_ids=ids,
                token_type_ids=None,
                labels=labels[: len(ids)],
                prompt_len=min(len(prompt), len(ids)),
            )
        )
    return out


def encode(data: Dataset, tokenizer, max_length: int, truncate: bool = False) -> list[Features]:
    if data.task == "classification":
        return encode_classification(data, tokenizer, max_length, truncate)
    return encode_causal_lm(data, tokenizer, max_length, truncate)


def collate(batch: Sequence[Features], pad: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest member (dynamic padding keeps CPU steps short)."""
    width = max(len(f.input_ids) for f in batch)
    n = len(batch)
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    has_types = batch[0].token_type_ids is not None
    types = torch.zeros((n, width), dtype=torch.long) if has_types else None
    labels = None
    if batch[0].labels is not None:
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(batch):
        k = len(f.input_ids)
        input_ids[i, :k] = torch.tensor(f.input_ids)
        attention[i, :k] = 1
        if types is not None and f.token_type_ids is not None:
            types[i, :k] = torch.tensor(f.token_type_ids)
        if labels is not None and f.labels is not None:
            labels[i, :k] = torch.tensor(f.labels)
    out["input_ids"] = input_ids
    out["attention_mask"] = attention
    if types is not None:
        out["token_type_ids"] = types
    if labels is not None:
        out["labels"] = labels
    else:
        out["labels"] = torch.tensor([f.label for f in batch], dtype=torch.long)
    return out


def batches(features: Sequence[Features], batch_size: int) -> list[list[Features]]:
    """Fixed-order chunks (evaluation and statistics passes)."""
    return [list(features[i : i + batch_size]) for i in range(0, len(features), batch_size)]
