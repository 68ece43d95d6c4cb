"""Rescaling what survives sparsification (mergekit's ``rescale``)."""

from __future__ import annotations

import torch

L1_EPS = 1e-7  # below this an L1 norm counts as zero and rescaling is skipped (as mergekit)


def rescale_l1_(delta: torch.Tensor, l1_before: torch.Tensor) -> None:
    """mergekit's rescale: multiply so the L1 norm equals the unpruned one (if both are > 1e-7)."""
    after = delta.abs().sum()
    if l1_before >= L1_EPS and after >= L1_EPS:
        delta.mul_(l1_before / after)
