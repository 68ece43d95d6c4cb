"""Fused CPU kernels (numba) for the inner loop of the sparse task-vector family.

The torch path of TIES runs some thirty tensor-wide operations per tensor (task vectors, norms,
magnitudes, histogram keys, masks, weighting, sign election, agreement, sums, division), each a
full pass over memory with a temporary of its own: about 0.45 s for an 11.5M-element tensor of
three models on two cores. Here the same arithmetic is three passes:

1. ``task_vectors_``: delta_i = theta_i - theta_0 in place, the report's input statistics, and
   the histogram of the top 16 bits of every |delta_i| (the first radix-selection level);
2. ``refine_histograms``: the next 16 bits inside each model's boundary bucket (exact
   thresholds, as ``ops.selection``);
3. ``combine_into``: keep-band, weighting, sign election, agreement, the (normalized) sum,
   lambda, the base, and the report's output statistics, written into the output buffer.

Every float32 operation is the one the torch path performs, in the same order, so outputs are
bit-identical to it (tests/test_fused.py); the report's sums of squares are accumulated in
float64 per block of coordinates, so they agree with the torch path's to rounding. Work is split
in fixed blocks of coordinates, so results never depend on the thread count.

numba is a dependency, imported on first use (``_kernels.py``); where it cannot be imported
(or ``WEIGHTSMITH_FUSED=0``) the torch path runs instead. Compiled kernels are cached on disk
(numba's ``cache=True``): the first merge on a machine compiles them (~11 s on the 2-core test
machine), later processes load them (~1-2 s, included in the benchmark figures).
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

import numpy as np
import torch

from weightsmith.ops.fused_blocks import BLOCK
from weightsmith.ops.fused_stats import record_input_stats, record_output_stats, returned_histograms

BUCKETS = 1 << 16
MIN_NUMEL = 1 << 14  # below this the torch path is as fast and skips the histogram set-up

# numba is imported with the kernels, on first use (``_kernels``); here only whether it exists.
_IMPORTED = importlib.util.find_spec("numba") is not None


def _k() -> Any:
    from weightsmith.ops import _kernels

    return _kernels


def available() -> bool:
    """Whether the fused kernels run (numba importable and not disabled by WEIGHTSMITH_FUSED=0)."""
    return _IMPORTED and os.environ.get("WEIGHTSMITH_FUSED", "1") != "0"


def usable(delta: torch.Tensor) -> bool:
    """Whether the kernels apply to this [N, ...] float tensor (CPU float32, big enough)."""
    return (
        available()
        and delta.device.type == "cpu"
        and delta.dtype == torch.float32
        and delta[0].numel() >= MIN_NUMEL
    )


def _blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def in_place_scratch(n_models: int, dtype: torch.dtype) -> int | None:
    """Per-element scratch of a method whose fused path works in place, where the kernels run
    (float32): one float32 per element, for the allocator's slack around the histograms and
    the blocks' temporaries (measured, tests/test_memory_budget.py). Elsewhere the engine's
    default (``MergeMethod.scratch_per_element``)."""
    return 4 if available() and dtype == torch.float32 else None


def _count_dtype(n: int) -> Any:
    # Per-thread histograms: uint32 counts halve their memory whenever they cannot overflow.
    return np.uint32 if n < 2**32 else np.int64


def selection_bytes(selections: int) -> int:
    """Peak histogram memory of exact selection for this many (model, rank) selections, for the
    engine's budget: per level, the per-thread uint32 histograms and their int64 sum, and at
    most two levels' (or a pending total and a new level's) alive at once."""
    threads = _threads() if _IMPORTED else 1
    return 2 * selections * BUCKETS * (4 * threads + 8)


def _threads() -> int:
    return _k().num_threads()


def new_histograms(rows: int, numel: int) -> np.ndarray:
    """Per-thread histogram accumulators for ``rows`` selections over ``numel`` keys, to pass as
    ``into`` to the functions below across the row blocks of one tensor (no per-block
    allocation: the blocks of a split tensor reuse one buffer), then ``sum_histograms``."""
    return np.zeros((_threads(), rows, BUCKETS), dtype=_count_dtype(numel))


def sum_histograms(hist: np.ndarray) -> list[torch.Tensor]:
    return list(torch.from_numpy(hist.sum(0, dtype=np.int64)))


def task_vectors_(
    models: torch.Tensor,
    base: torch.Tensor,
    histograms: list[bool],
    stats: dict[str, float] | None,
    into: np.ndarray | None = None,
) -> list[torch.Tensor | None]:
    """delta_i = models[i] - base in place, with the report's input statistics into ``stats``
    (None: a statistics pass, which needs none of them, skips their work).

    Returns, for each model with ``histograms[i]``, the 65536-bucket int64 histogram of the top
    16 bits of |delta_i| as float32 keys (radix selection's first level), else None. With
    ``into`` (from ``new_histograms(n_models, ...)``) the counts are added there instead and
    nothing is returned.
    """
    n_models = models.shape[0]
    n = base.numel()
    flat = models.reshape(n_models, n).numpy()
    nb = _blocks(n) if stats is not None else 1
    if into is not None:
        hist = into
    elif any(histograms):
        hist = new_histograms(n_models, n)
    else:
        hist = np.zeros((1, 1, 1), dtype=np.uint32)
    fstats = np.zeros((nb, 1 + 2 * n_models))
    istats = np.zeros((nb, n_models), dtype=np.int64)
    want = np.array(histograms, dtype=np.bool_)
    _k()._task_vectors(
        flat, base.reshape(n).numpy(), flat.view(np.int32), want, stats is not None, hist, fstats, istats
    )
    if stats is not None:
        record_input_stats(stats, fstats, istats, n, n_models)
    return returned_histograms(histograms, into, lambda: sum_histograms(hist))


def subtract_(models: torch.Tensor, base: torch.Tensor) -> None:
    """delta_i = models[i] - base in place, nothing else (for statistics passes)."""
    task_vectors_(models, base, [False] * models.shape[0], None)


def refine_histograms(
    delta: torch.Tensor, selections: list[tuple[int, int]], into: np.ndarray | None = None
) -> list[torch.Tensor]:
    """For each selection (model i, top digit): the histogram of the low 16 bits of the
    |delta_i| keys whose top 16 bits equal that digit (radix selection's second level).
    With ``into`` (``new_histograms(len(selections), ...)``) the counts are added there."""
    if not selections:
        return []
    n_models = delta.shape[0]
    flat = delta.reshape(n_models, -1).numpy()
    hist = into if into is not None else new_histograms(len(selections), flat.shape[1])
    rows = np.array([i for i, _ in selections], dtype=np.int64)
    digits = np.array([d for _, d in selections], dtype=np.int32)
    _k()._refine(flat.view(np.int32), rows, digits, hist)
    return [] if into is not None else sum_histograms(hist)


def combine_into(
    out: torch.Tensor,
    delta: torch.Tensor,
    base: torch.Tensor,
    keep: list[tuple[float, float]],
    weight: list[float],
    lam: float,
    normalize: bool,
    consensus: bool,
    stats: dict[str, float],
) -> torch.Tensor:
    """``sparse.combine.combine`` fused, with entries outside the magnitude band ``keep[i]`` = (lo, hi)
    of model i treated as trimmed (lo <= |delta_i| <= hi is kept; NaN is kept)."""
    n_models = delta.shape[0]
    n = base.numel()
    nb = _blocks(n)
    f32 = np.float32
    wsum = sum(weight)
    fstats = np.zeros((nb, n_models + 2))
    istats = np.zeros((nb, n_models + 3), dtype=np.int64)
    _k()._combine(
        delta.reshape(n_models, n).numpy(),
        base.reshape(n).numpy(),
        np.array([k[0] for k in keep], dtype=f32),
        np.array([k[1] for k in keep], dtype=f32),
        np.array(weight, dtype=f32),
        f32(lam),
        lam != 1,
        normalize,
        consensus,
        f32(1.0 if abs(wsum) < 1e-8 else wsum),
        out.reshape(n).numpy(),
        fstats,
        istats,
    )
    record_output_stats(stats, fstats, istats, n_models, elected=consensus)
    return out


AGGREGATION_CODES = {"dis-mean": 0, "dis-sum": 1, "dis-max": 2}


def elected_sign_sum(delta: torch.Tensor, thresholds: list[float], weight: list[float]) -> int:
    """Sum over coordinates of sign(sum_i w_i [|delta_i| >= thr_i] delta_i), exactly (TIES'
    model-wide majority sign). ``thresholds``: 0 where a task is not trimmed."""
    n_models = delta.shape[0]
    return int(
        _k()._elected_sign_sum(
            delta.reshape(n_models, -1).numpy(),
            np.array(thresholds, dtype=np.float32),
            np.array(weight, dtype=np.float32),
        )
    )


def ties_model_combine_into(
    out: torch.Tensor,
    delta: torch.Tensor,
    base: torch.Tensor,
    thresholds: list[float],
    weight: list[float],
    majority: int,
    aggregation: str,
    lam: float,
    stats: dict[str, float],
) -> torch.Tensor:
    """The output pass of TIES ``scope: model`` (ops/ties.py ``_apply_model_scope``), fused."""
    n_models = delta.shape[0]
    n = base.numel()
    nb = _blocks(n)
    fstats = np.zeros((nb, n_models + 2))
    istats = np.zeros((nb, n_models + 3), dtype=np.int64)
    _k()._model_combine(
        delta.reshape(n_models, n).numpy(),
        base.reshape(n).numpy(),
        np.array(thresholds, dtype=np.float32),
        np.full(n_models, np.inf, dtype=np.float32),  # no upper bound
        np.array(weight, dtype=np.float32),
        majority,
        AGGREGATION_CODES[aggregation],
        np.float32(lam),
        lam != 1,
        out.reshape(n).numpy(),
        fstats,
        istats,
    )
    record_output_stats(stats, fstats, istats, n_models, elected=True)
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel now, on a tiny input, so that the
    first real tensor does not pay for it (and memory measurements see only tensor memory)."""
    if not available():
        return
    delta = torch.ones(1, 8)
    base = torch.zeros(8)
    out = torch.empty(8)
    scratch: dict[str, float] = {}
    task_vectors_(delta, base, [True], scratch)
    refine_histograms(delta, [(0, 0)])
    combine_into(out, delta, base, [(0.0, math.inf)], [1.0], 0.5, True, True, scratch)
    combine_into(out, delta, base, [(0.0, math.inf)], [1.0], 1.0, True, False, scratch)
    elected_sign_sum(delta, [0.0], [1.0])
    ties_model_combine_into(out, delta, base, [0.0], [1.0], 1, "dis-mean", 1.0, scratch)


def set_threads(n: int) -> Any:
    """Use ``n`` kernel threads (clamped to numba's pool); returns the previous count."""
    if not _IMPORTED:
        return None
    previous = _k().num_threads()
    _k().set_num_threads(n)
    return previous
