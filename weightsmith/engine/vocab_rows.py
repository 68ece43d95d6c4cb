"""Vocabulary tensors aligned to a merged tokenizer: each output row of an input is one of its
own rows (read by index, consecutive rows in one read) or a shared fill row.

The alignment (``io/tokenizer_build.py``) is known from the tokenizers before any tensor is
read, so the plan gives each input of an embedding or LM-head task a ``RowGather``. A unit of
output rows ``[start, stop)`` then reads only the input rows it maps to: a row block never
needs the whole input tensor. Fill rows are a handful of vectors per task, computed on first
use and kept (their bytes are in the plan's peak estimate); a padding row (the mean of a
model's aligned rows) is summed over the tensor block by block.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from weightsmith.engine.keys import VOCAB_NAME
from weightsmith.engine.tasks import Source
from weightsmith.io.checkpoint import Checkpoint

# Rows summed at once while averaging a model's aligned rows (the padding rows' value).
_MEAN_BLOCK_ROWS = 256


@dataclass(eq=False)
class TaskFills:
    """The fill rows of one vocabulary task: each the mean of (input, row) pairs, () for zero,
    None for the padding rows (per input). Computed once, in ``dtype``."""

    defs: list[tuple[tuple[Source, int], ...] | None]
    vocab_len: int
    cache: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)  # padding rows read fills


@dataclass(frozen=True, eq=False)
class RowGather:
    """Output row i of this input is its row ``rows[i]``, or fill ``-1 - rows[i]`` if negative."""

    rows: tuple[int, ...]
    fills: TaskFills

    def __repr__(self) -> str:
        # Compact and the same every run: the resume fingerprint hashes the tasks' reprs.
        what = repr((self.rows, self.fills.defs, self.fills.vocab_len)).encode()
        return f"RowGather(rows={len(self.rows)}, sha256={hashlib.sha256(what).hexdigest()[:16]})"


def gather_sources(
    alignment: Any,
    checkpoints: list[Checkpoint],
    name: str,
    shape: tuple[int, ...],
    sources: list[Source],
    base: Source | None,
) -> tuple[tuple[int, ...], list[Source], Source | None] | None:
    """Inputs of a vocabulary tensor with row gathers (None: not a vocabulary tensor, or every
    input is already in the output's order)."""
    every = ([base] if base else []) + sources
    if not VOCAB_NAME.search(name) or not shape:
        return None
    for src in every:
        have = checkpoints[src.ckpt].entry(src.key).shape
        if src.ckpt not in alignment.row_maps or not have or have[0] != alignment.input_rows[src.ckpt]:
            return None
    if all(alignment.is_identity(s.ckpt, checkpoints[s.ckpt].entry(s.key).shape[0]) for s in every):
        return None
    by_ckpt = {s.ckpt: s for s in every}
    defs = [None if fill is None else tuple((by_ckpt[i], row) for i, row in fill) for fill in alignment.fills]
    fills = TaskFills(defs, alignment.vocab_len)
    fixed = [Source(s.ckpt, s.key, gather=RowGather(alignment.row_maps[s.ckpt], fills)) for s in every]
    out_shape = (alignment.rows, *shape[1:])
    return out_shape, fixed[1:] if base else fixed, fixed[0] if base else None


def fill_bytes(gather: RowGather, row_numel: int, n_inputs: int, itemsize: int) -> int:
    """Memory the fill rows of one task hold once computed (plus the block that sums a
    padding row)."""
    shared = sum(1 for d in gather.fills.defs if d is not None)
    padding = n_inputs + _MEAN_BLOCK_ROWS if None in gather.fills.defs else 0
    return (shared + padding) * row_numel * itemsize


def read_gathered(
    checkpoints: list[Checkpoint],
    src: Source,
    rows: tuple[int, int],
    dest: torch.Tensor,
    raw: torch.Tensor | None,
) -> None:
    """Output rows ``[start, stop)`` of ``src`` into ``dest`` (its dtype): runs of consecutive
    input rows are read in one go, fill rows copied from the task's cache."""
    gather = src.gather
    assert gather is not None
    ckpt = checkpoints[src.ckpt]
    entry = ckpt.entry(src.key)
    start, stop = rows
    i = start
    while i < stop:
        r = gather.rows[i]
        if r < 0:
            dest[i - start].copy_(_fill(checkpoints, src, -1 - r, dest.dtype))
            i += 1
            continue
        j = i + 1
        while j < stop and gather.rows[j] == gather.rows[j - 1] + 1:
            j += 1
        part = dest[i - start : j - start]
        if entry.dtype == dest.dtype:
            ckpt.read_into(src.key, part.reshape(-1).view(torch.uint8), (r, r + j - i))
        else:
            need = part.numel() * entry.dtype.itemsize
            buf = raw if raw is not None and raw.numel() >= need else torch.empty(need, dtype=torch.uint8)
            part.copy_(ckpt.read_into(src.key, buf, (r, r + j - i)))
        i = j


def _fill(checkpoints: list[Checkpoint], src: Source, k: int, dtype: torch.dtype) -> torch.Tensor:
    assert src.gather is not None
    fills = src.gather.fills
    key = (k, src.ckpt if fills.defs[k] is None else -1)
    with fills.lock:
        if key not in fills.cache:
            d = fills.defs[k]
            fills.cache[key] = (
                _padding_row(checkpoints, src, dtype) if d is None else _mean_row(checkpoints, d, dtype)
            )
        return fills.cache[key]


def _mean_row(
    checkpoints: list[Checkpoint], pairs: tuple[tuple[Source, int], ...], dtype: torch.dtype
) -> torch.Tensor:
    rows = [checkpoints[s.ckpt].read(s.key, (r, r + 1))[0].to(dtype) for s, r in pairs]
    if not rows:
        return torch.zeros((), dtype=dtype)  # broadcast by copy_ into the row
    total = torch.zeros_like(rows[0])
    for row in rows:
        total = total + row
    return total / len(rows)


def _padding_row(checkpoints: list[Checkpoint], src: Source, dtype: torch.dtype) -> torch.Tensor:
    """The mean of this input's aligned rows (what mergekit gives rows past the vocabulary)."""
    assert src.gather is not None
    n = src.gather.fills.vocab_len
    width = checkpoints[src.ckpt].entry(src.key).shape[1:]
    total = torch.zeros(width, dtype=torch.float64)
    block = torch.empty((min(_MEAN_BLOCK_ROWS, n), *width), dtype=dtype)
    for start in range(0, n, _MEAN_BLOCK_ROWS):
        stop = min(n, start + _MEAN_BLOCK_ROWS)
        part = block[: stop - start]
        read_gathered(checkpoints, src, (start, stop), part, None)
        total += part.to(torch.float64).sum(dim=0)
    return (total / n).to(dtype)


def apply_alignment(plan: Any, alignment: Any, opened: list[Checkpoint]) -> None:
    """Give an already built plan (a sliced or per-module recipe's) its row gathers: every
    merge task over a vocabulary tensor gets them, then the units are cut again. ``alignment``
    is keyed by the index in ``opened``; the plan may hold a subset of them, renumbered."""
    from dataclasses import replace

    from weightsmith.engine.tasks import split_units
    from weightsmith.errors import MergeError

    where = {id(c): i for i, c in enumerate(opened)}
    index = {j: where[id(c)] for j, c in enumerate(plan.checkpoints) if id(c) in where}
    alignment = replace(
        alignment,
        row_maps={j: alignment.row_maps[i] for j, i in index.items() if i in alignment.row_maps},
        input_rows={j: alignment.input_rows[i] for j, i in index.items() if i in alignment.input_rows},
    )
    plan.vocab = alignment
    plan.notes += alignment.notes
    for task in plan.tasks:
        if task.kind != "merge" or not task.models:
            if task.kind == "copy" and task.base is not None and VOCAB_NAME.search(task.name):
                ckpt = plan.checkpoints[task.base.ckpt]
                rows = ckpt.entry(task.base.key).shape[0] if task.shape else 0
                if task.base.ckpt in alignment.row_maps and not alignment.is_identity(task.base.ckpt, rows):
                    raise MergeError(
                        f"tensor {task.name!r} is copied from {ckpt.ref!r}, whose vocabulary the "
                        "tokenizer merge realigns; merge it from the slices' models instead"
                    )
            continue
        gathered = gather_sources(alignment, plan.checkpoints, task.name, task.shape, task.models, task.base)
        if gathered is None:
            continue
        task.shape, task.models, task.base = gathered
        row_numel = task.numel // task.shape[0]
        plan.fill_bytes += fill_bytes(task.models[0].gather, row_numel, len(task.models) + 1, 8)
    plan.units, plan.oversize = [], []
    split_units(plan)
