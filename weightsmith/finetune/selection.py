"""Which parameters train: freeze / train-only patterns, Half Fine-Tuning, sparse masks."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from weightsmith.errors import CheckpointError
from weightsmith.finetune.modeling import KeyResolver

# A transformer block is "<container>.<index>." in every common architecture's naming.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def matches(pattern: str, name: str) -> bool:
    """Regex search; an invalid regex is treated as a plain substring (e.g. ``lm_head(``)."""
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return pattern in name


def half_freeze_names(names: Sequence[tuple[str, int]], seed: int) -> set[str]:
    """HFT: freeze a seeded random half of each block's weight matrices (with their biases).

    ``names`` are ``(parameter name, ndim)`` pairs. Each block draws from its own generator
    seeded by ``(seed, block index)`` so adding layers does not reshuffle earlier blocks.
    """
    blocks: dict[str, list[str]] = {}
    for name, ndim in names:
        m = _BLOCK.search(name)
        if m and ndim >= 2:
            blocks.setdefault(name[: m.end()], []).append(name)
    frozen: set[str] = set()
    all_names = {n for n, _ in names}
    for block, mats in blocks.items():
        mats.sort()
        index = int(_BLOCK.search(block).group(1))  # type: ignore[union-attr]
        gen = torch.Generator().manual_seed(seed * 100_003 + index)
        order = torch.randperm(len(mats), generator=gen).tolist()
        for i in order[: len(mats) // 2]:
            frozen.add(mats[i])
            if mats[i].endswith(".weight"):
                bias = mats[i][: -len("weight")] + "bias"
                if bias in all_names:
                    frozen.add(bias)
    return frozen


def select_trainable(
    model: torch.nn.Module,
    freeze: Sequence[str] = (),
    train_only: Sequence[str] = (),
    half_freeze: bool = False,
    seed: int = 0,
) -> set[str]:
    """Parameter names left trainable; everything else gets ``requires_grad = False``."""
    params = list(model.named_parameters())
    trainable = {n for n, _ in params}
    if train_only:
        trainable = {n for n in trainable if any(matches(p, n) for p in train_only)}
    if freeze:
        trainable = {n for n in trainable if not any(matches(p, n) for p in freeze)}
    if half_freeze:
        trainable -= half_freeze_names([(n, p.dim()) for n, p in params], seed)
    return trainable


class SparseMask:
    """Sparse fine-tuning: only entries where the mask is nonzero may ever change.

    Gradients are zeroed outside the mask before each step, and the original values are written
    back after it, because AdamW's weight decay and momentum would otherwise still move them.
    """

    def __init__(self, model: torch.nn.Module, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: mask file not found")
        resolver = KeyResolver(model)
        params = dict(model.named_parameters())
        masks: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    name = resolver.resolve(key)
                    if name is None or name not in params:
                        raise CheckpointError(f"{path}: mask entry {key!r} matches no trainable parameter")
                    mask = f.get_tensor(key)
                    if tuple(mask.shape) != tuple(params[name].shape):
                        raise CheckpointError(
                            f"{path}: mask {key!r} has shape {tuple(mask.shape)}, parameter "
                            f"{name!r} has {tuple(params[name].shape)}"
                        )
                    masks[name] = mask != 0
        except (OSError, ValueError) as err:  # safetensors raises these on a corrupt header
            raise CheckpointError(f"{path}: cannot read mask ({err})") from None
        # Parameters absent from the mask, or masked out entirely, are simply frozen.
        self.trainable = {n for n, m in masks.items() if bool(m.any())}
        self._partial = {
            n: (m, params[n].detach().clone())
            for n, m in masks.items()
            if n in self.trainable and not bool(m.all())
        }
        self._params = params

    def mask_grads(self) -> None:
        for name, (mask, _) in self._partial.items():
            grad = self._params[name].grad
            if grad is not None:
                grad.mul_(mask)

    @torch.no_grad()
    def restore(self) -> None:
        for name, (mask, original) in self._partial.items():
            p = self._params[name]
            p.copy_(torch.where(mask, p, original))
