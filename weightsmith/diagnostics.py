"""Task-vector diagnostics: how far, how alike and how much in conflict fine-tunes moved a base.

    from weightsmith.diagnostics import (
        cosine_similarity_matrix, sign_conflicts_by_layer, task_vector_norms)
    norms = task_vector_norms(base, [ft_a, ft_b])          # {ref: {"layer 0": ..., "total": ...}}
    cos = cosine_similarity_matrix(base, [ft_a, ft_b])      # n x n tensor
    conflicts = sign_conflicts_by_layer(base, [ft_a, ft_b]) # {"layer 0": 0.31, ...}

A task vector is ``finetuned - base``. Everything is streamed like a merge: one tensor (or a
block of its rows) of each model is in memory at a time, so these run on models far larger
than RAM. Sums are accumulated in float64 so billions of terms do not lose precision. Only
floating-point tensors count; checkpoints must share keys and shapes.

Tensors are grouped by transformer layer from their names (``model.layers.3.mlp...`` is
"layer 3"); tensors outside numbered layers (embeddings, final norm, head) form "other".
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from weightsmith.io.checkpoint import Checkpoint
from weightsmith.lazy import check_same_keys

ModelRef = Checkpoint | str | os.PathLike[str]

# Bounds the elements of one tensor block read per model (64 MiB in float32).
BLOCK_ELEMENTS = 16 * 1024 * 1024
OTHER = "other"
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> str:
    """The group a tensor belongs to: ``"layer N"`` for numbered blocks, else ``"other"``."""
    match = _LAYER.search(name)
    return f"layer {int(match.group(1))}" if match else OTHER


def _group_order(group: str) -> tuple[int, int]:
    return (1, 0) if group == OTHER else (0, int(group.split()[1]))


def _open(model: ModelRef) -> Checkpoint:
    return model if isinstance(model, Checkpoint) else Checkpoint.open(model)


def _task_vector_blocks(
    base: ModelRef, models: Sequence[ModelRef], block_elements: int
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """Yield ``(tensor name, [task-vector block of each model])`` in float32, block by block."""
    if not models:
        raise ValueError("give at least one fine-tuned model")
    base_ckpt = _open(base)
    ckpts = [_open(m) for m in models]
    check_same_keys([base_ckpt, *ckpts])
    for name in base_ckpt.keys():
        entry = base_ckpt.entry(name)
        if not entry.dtype.is_floating_point or entry.numel == 0:
            continue
        shape = entry.shape
        rows = shape[0] if shape else 1
        per_row = max(1, entry.numel // rows)
        step = max(1, block_elements // per_row)
        for start in range(0, rows, step):
            span = (start, min(rows, start + step)) if shape and step < rows else None
            b = base_ckpt.read(name, span).float()
            yield name, [(c.read(name, span).float() - b).reshape(-1) for c in ckpts]
            if span is None:
                break


def task_vector_norms(
    base: ModelRef, models: Sequence[ModelRef], *, block_elements: int = BLOCK_ELEMENTS
) -> dict[str, dict[str, float]]:
    """L2 norm of each model's task vector, per layer and in total.

    Returns ``{model ref: {"layer 0": ..., ..., "other": ..., "total": ...}}`` (layers in
    order). The per-layer squares add up to the total's square.
    """
    refs = [_label(m) for m in models]
    squares: list[dict[str, float]] = [{} for _ in models]
    for name, tvs in _task_vector_blocks(base, models, block_elements):
        group = layer_of(name)
        for i, tv in enumerate(tvs):
            squares[i][group] = squares[i].get(group, 0.0) + float(tv.double().square().sum())
    out: dict[str, dict[str, float]] = {}
    for ref, sq in zip(refs, squares):
        norms = {g: sq[g] ** 0.5 for g in sorted(sq, key=_group_order)}
        norms["total"] = sum(sq.values()) ** 0.5
        out[_unique_key(out, ref)] = norms
    return out


def cosine_similarity_matrix(
    base: ModelRef, models: Sequence[ModelRef], *, block_elements: int = BLOCK_ELEMENTS
) -> torch.Tensor:
    """``n x n`` (float64) cosine similarities between the models' whole task vectors.

    Built from the Gram matrix of dot products accumulated tensor by tensor; a zero task
    vector has similarity 0 with everything (and 1 with itself only if it is nonzero).
    """
    n = len(models)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for _, tvs in _task_vector_blocks(base, models, block_elements):
        stacked = torch.stack(tvs).double()
        gram += stacked @ stacked.T
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    return torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))


def sign_conflicts_by_layer(
    base: ModelRef, models: Sequence[ModelRef], *, block_elements: int = BLOCK_ELEMENTS
) -> dict[str, float]:
    """Per layer, the fraction of parameters whose task-vector entries disagree in sign.

    An entry conflicts when at least one model moved it up and another moved it down (zeros
    take no side), the interference TIES-merging resolves by electing a sign. Returns
    ``{"layer 0": rate, ..., "other": rate, "total": rate}`` with rates in [0, 1].
    """
    if len(models) < 2:
        raise ValueError("sign conflicts need at least two fine-tuned models")
    conflicts: dict[str, int] = {}
    counts: dict[str, int] = {}
    for name, tvs in _task_vector_blocks(base, models, block_elements):
        stacked = torch.stack(tvs)
        clash = (stacked > 0).any(dim=0) & (stacked < 0).any(dim=0)
        group = layer_of(name)
        conflicts[group] = conflicts.get(group, 0) + int(clash.sum())
        counts[group] = counts.get(group, 0) + clash.numel()
    rates = {g: conflicts[g] / counts[g] for g in sorted(counts, key=_group_order)}
    rates["total"] = sum(conflicts.values()) / max(1, sum(counts.values()))
    return rates


def _label(model: ModelRef) -> str:
    return model.ref if isinstance(model, Checkpoint) else str(Path(model))


def _unique_key(existing: dict[str, object], key: str) -> str:
    # The same model given twice keeps both rows rather than overwriting one.
    if key not in existing:
        return key
    n = 2
    while f"{key} ({n})" in existing:
        n += 1
    return f"{key} ({n})"
