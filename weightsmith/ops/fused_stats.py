"""Host-side bookkeeping the fused kernels share, CPU (``fused.py``) and CUDA (``cuda_fused.py``):
the kernels' per-block report numbers summed into merge_report.json's keys, and which first-level
histograms a ``task_vectors_`` call returns. Both take host numpy arrays and plain lists, so the
two families report the same keys from the same code."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


def record_input_stats(
    stats: dict[str, float], fstats: np.ndarray, istats: np.ndarray, n: int, n_models: int
) -> None:
    """``task_vectors_``'s per-block numbers (float64 columns: the base's, each model's and each
    task vector's sum of squares; int64 columns: each task vector's nonzeros), summed."""
    f = fstats.sum(0)
    counts = istats.sum(0)
    stats["numel"] = float(n)
    stats["sq_base"] = float(f[0])
    for i in range(n_models):
        stats[f"sq_model[{i}]"] = float(f[1 + i])
    for i in range(n_models):
        stats[f"sq_tv[{i}]"] = float(f[1 + n_models + i])
        stats[f"nonzero_tv[{i}]"] = float(counts[i])


def record_output_stats(
    stats: dict[str, float], fstats: np.ndarray, istats: np.ndarray, n_models: int, elected: bool
) -> None:
    """The combine kernels' per-block numbers, summed into the report's keys (those of
    ``sparse.combine.combine``): kept entries and their squares per model, sign conflicts, active
    coordinates, the elected sign balance, and the squared norms of the output and its delta."""
    f = fstats.sum(0)
    c = istats.sum(0)
    for i in range(n_models):
        stats[f"kept[{i}]"] = float(c[i])
        stats[f"sq_kept[{i}]"] = float(f[i])
    stats["conflict"], stats["active"] = float(c[n_models]), float(c[n_models + 1])
    if elected:
        stats["elected_pos"] = float(c[n_models + 2])
        stats["elected_neg"] = stats["active"] - stats["elected_pos"]
    stats["sq_delta_out"] = float(f[n_models])
    stats["sq_out"] = float(f[n_models + 1])


def returned_histograms(
    histograms: list[bool], into: object | None, summed: Callable[[], Sequence[torch.Tensor]]
) -> list[torch.Tensor | None]:
    """What ``task_vectors_`` returns: for each model with ``histograms[i]`` its summed host
    histogram (``summed()`` reads them: called only when one is wanted), else None; all None
    when the counts went ``into`` the caller's accumulators."""
    if into is not None or not any(histograms):
        return [None] * len(histograms)
    hist = summed()
    return [hist[i] if want else None for i, want in enumerate(histograms)]
