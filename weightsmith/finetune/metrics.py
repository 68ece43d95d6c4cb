"""Classification metrics computed from collected probabilities."""

from __future__ import annotations

import torch

ECE_BINS = 15


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins: sum_b |B|/n * |accuracy(B) - confidence(B)|.

    Bin b covers (b/bins, (b+1)/bins]; a confidence of exactly 0 (impossible for a softmax
    maximum) would fall into the first bin.
    """
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    confidence = confidence.double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    n = len(labels)
    ece = 0.0
    for b in range(bins):
        in_bin = index == b
        count = int(in_bin.sum())
        if count:
            gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs().item()
            ece += count / n * gap
    return ece
