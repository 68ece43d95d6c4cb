"""Device (CUDA) twins of the fused CPU kernels (``weightsmith.ops.fused``): same entry points,
same arguments, same results bit for bit, on tensors that live on a GPU.

The kernels (``cuda_kernels.py``) are numba.cuda kernels launched on torch CUDA tensors
through the CUDA array interface (zero copy; CuPy arrays share memory with torch the same way,
``torch.as_tensor(cupy_array, device="cuda")``), on the tensor's current torch stream unless a
``stream`` is given, so they order with the engine's torch work on that stream. Under numba's
CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before numba.cuda is first imported) the same
kernels run on CPU tensors, which is how CI checks them (tests/test_gpu_sim.py).

What equals the CPU fused path (and so the torch path) bit for bit: the output tensor, the task
vectors written in place, the histograms (integer counts), ``elected_sign_sum`` and every count
in the report statistics. The report's sums of squares are float64 sums reduced per block in a
fixed order (the same on every run) but not the CPU's order: they agree to float64 rounding
(far inside the 1e-4 the torch path is held to). NaN inputs: the engine raises
``NonFiniteInput`` before any combine; a NaN that reaches a combine stays NaN, but a GPU writes
the canonical NaN where the CPU propagates the input's payload bits.

numba.cuda is imported on first use, never by ``import weightsmith``.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from weightsmith.errors import MergeError
from weightsmith.ops.fused import AGGREGATION_CODES, BLOCK, BUCKETS, _record_output_stats

MIN_NUMEL = 1 << 14  # below this a launch costs more than the torch path's few small ops

_IMPORTED = importlib.util.find_spec("numba") is not None


@dataclass(frozen=True)
class Launch:
    """Coordinates per CUDA block (``chunk``). Outputs never depend on it; the report's float64
    sums are reduced per chunk, so their last bits do."""

    chunk: int = BLOCK


LAUNCH = Launch()


def _k() -> Any:
    from weightsmith.ops import cuda_kernels

    return cuda_kernels


def _cuda() -> Any:
    from numba import cuda

    return cuda


def simulated() -> bool:
    """Whether numba runs CUDA kernels in its simulator (on CPU arrays)."""
    return bool(_IMPORTED and _k().SIMULATOR)


def available() -> bool:
    """Whether the kernels can run: numba.cuda with a driver and a device, or the simulator."""
    if not _IMPORTED:
        return False
    try:
        return bool(_cuda().is_available())
    except Exception:  # a broken CUDA install reads as "no device", as torch.cuda does
        return False


def usable(delta: torch.Tensor) -> bool:
    """Whether these kernels apply to this [N, ...] tensor: float32, on a CUDA device (CPU
    under the simulator), big enough to be worth a launch."""
    on_device = delta.device.type == "cuda" or (delta.device.type == "cpu" and simulated())
    return on_device and delta.dtype == torch.float32 and delta[0].numel() >= MIN_NUMEL and available()


def _array(x: torch.Tensor, name: str) -> Any:
    """The kernels' view of a tensor: zero-copy on a device, the numpy view in the simulator."""
    if x.device.type == "cuda":
        return _cuda().as_cuda_array(x.detach())
    if simulated():
        return x.detach().numpy()
    raise MergeError(
        f"{name}: the CUDA kernels take tensors on a CUDA device, got one on {x.device}; "
        "move the unit to the device first (--device cuda) or use the CPU fused kernels"
    )


def _stream(like: torch.Tensor, stream: Any) -> Any:
    """A numba stream: the given one (torch or numba), else torch's current stream on the
    tensor's device, so the kernels run in order with the engine's torch work."""
    cuda = _cuda()
    if simulated():
        return cuda.stream()  # the simulator runs everything synchronously
    if stream is None:
        stream = torch.cuda.current_stream(like.device)
    if isinstance(stream, torch.cuda.Stream):
        return cuda.external_stream(stream.cuda_stream)
    return stream


def _small(values: Any, dtype: Any, stream: Any) -> Any:
    return _cuda().to_device(np.ascontiguousarray(values, dtype=dtype), stream=stream)


def _blocks(n: int) -> int:
    return (n + LAUNCH.chunk - 1) // LAUNCH.chunk


def _grid(n: int) -> tuple[int, int]:
    return _blocks(n), _k().THREADS


def selection_bytes(selections: int) -> int:
    """Device histogram memory of exact selection for this many selections (two levels alive
    at most, 65536 uint64 buckets each)."""
    return 2 * selections * BUCKETS * 8


def new_histograms(rows: int, numel: int, *, stream: Any = None) -> Any:
    """Device histogram accumulators (``rows`` x 65536 uint64) for ``into`` below, across the
    row blocks of one tensor; read them with ``sum_histograms``. (``numel`` for the CPU twin's
    signature: uint64 counts never overflow.)"""
    zeros = np.zeros((rows, BUCKETS), dtype=np.uint64)
    return _cuda().to_device(zeros, stream=0 if stream is None else stream)


def sum_histograms(hist: Any, *, stream: Any = None) -> list[torch.Tensor]:
    """The host int64 histograms, one per row (what ``RadixSelect.absorb`` takes)."""
    host = hist.copy_to_host(stream=0 if stream is None else stream)
    if stream is not None:
        stream.synchronize()
    return list(torch.from_numpy(host.astype(np.int64)))


def task_vectors_(
    models: torch.Tensor,
    base: torch.Tensor,
    histograms: list[bool],
    stats: dict[str, float] | None,
    into: Any = None,
    *,
    stream: Any = None,
) -> list[torch.Tensor | None]:
    """``fused.task_vectors_`` on the device: delta_i = models[i] - base in place, the input
    statistics into ``stats`` (None: skipped), and the first-level histograms of the models
    with ``histograms[i]`` (returned on the host, or added into ``into``)."""
    n_models = models.shape[0]
    n = base.numel()
    s = _stream(models, stream)
    flat = _array(models.reshape(n_models, n), "task_vectors_")
    want_stats = stats is not None
    if into is not None:
        hist = into
    elif any(histograms):
        hist = new_histograms(n_models, n, stream=s)
    else:
        hist = new_histograms(1, 0, stream=s)
    nb = _blocks(n) if n else 0
    fstats = _small(np.zeros((max(nb, 1), 1 + 2 * n_models)), np.float64, s)
    istats = _small(np.zeros((max(nb, 1), n_models), dtype=np.int64), np.int64, s)
    if n:
        _k().task_vectors[_grid(n) + (s,)](
            flat, _array(base.reshape(n), "task_vectors_"), _small(histograms, np.uint8, s), want_stats,
            LAUNCH.chunk, hist, fstats, istats,
        )
    if want_stats:
        f = fstats.copy_to_host(stream=s).sum(0)
        counts = istats.copy_to_host(stream=s).sum(0)
        s.synchronize()
        stats["numel"] = float(n)
        stats["sq_base"] = float(f[0])
        for i in range(n_models):
            stats[f"sq_model[{i}]"] = float(f[1 + i])
        for i in range(n_models):
            stats[f"sq_tv[{i}]"] = float(f[1 + n_models + i])
            stats[f"nonzero_tv[{i}]"] = float(counts[i])
    if into is not None or not any(histograms):
        return [None] * n_models
    summed = sum_histograms(hist, stream=s)
    return [summed[i] if histograms[i] else None for i in range(n_models)]


def subtract_(models: torch.Tensor, base: torch.Tensor, *, stream: Any = None) -> None:
    """delta_i = models[i] - base in place, nothing else (statistics passes)."""
    task_vectors_(models, base, [False] * models.shape[0], None, stream=stream)


def refine_histograms(
    delta: torch.Tensor, selections: list[tuple[int, int]], into: Any = None, *, stream: Any = None
) -> list[torch.Tensor]:
    """``fused.refine_histograms`` on the device: for each (model i, top digit) the histogram
    of the low 16 bits of the |delta_i| keys under that digit."""
    if not selections:
        return []
    n_models = delta.shape[0]
    n = delta[0].numel()
    s = _stream(delta, stream)
    hist = into if into is not None else new_histograms(len(selections), n, stream=s)
    if n:
        bits = delta.reshape(n_models, n).view(torch.int32)
        _k().refine[_grid(n) + (s,)](
            _array(bits, "refine_histograms"),
            _small([i for i, _ in selections], np.int64, s),
            _small([d for _, d in selections], np.int32, s),
            LAUNCH.chunk,
            hist,
        )
    return [] if into is not None else sum_histograms(hist, stream=s)


def _output_stats(n_models: int, n: int, s: Any) -> tuple[Any, Any]:
    nb = max(_blocks(n), 1)
    return (
        _small(np.zeros((nb, n_models + 2)), np.float64, s),
        _small(np.zeros((nb, n_models + 3), dtype=np.int64), np.int64, s),
    )


def _record(stats: dict[str, float], fstats: Any, istats: Any, n_models: int, elected: bool, s: Any) -> None:
    f = fstats.copy_to_host(stream=s)
    i = istats.copy_to_host(stream=s)
    s.synchronize()
    _record_output_stats(stats, f, i, n_models, elected)


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
    *,
    stream: Any = None,
) -> torch.Tensor:
    """``fused.combine_into`` on the device (keep band, weighting, sign election, agreement,
    normalized sum, lambda, base, output statistics)."""
    n_models = delta.shape[0]
    n = base.numel()
    s = _stream(delta, stream)
    f32 = np.float32
    wsum = sum(weight)
    fstats, istats = _output_stats(n_models, n, s)
    if n:
        _k().combine[_grid(n) + (s,)](
            _array(delta.reshape(n_models, n), "combine_into"),
            _array(base.reshape(n), "combine_into"),
            _small([k[0] for k in keep], f32, s),
            _small([k[1] for k in keep], f32, s),
            _small(weight, f32, s),
            f32(lam),
            lam != 1,
            normalize,
            consensus,
            f32(1.0 if abs(wsum) < 1e-8 else wsum),
            LAUNCH.chunk,
            _array(out.reshape(n), "combine_into"),
            fstats,
            istats,
        )
    _record(stats, fstats, istats, n_models, consensus, s)
    return out


def elected_sign_sum(
    delta: torch.Tensor, thresholds: list[float], weight: list[float], *, stream: Any = None
) -> int:
    """Exact sum over coordinates of sign(sum_i w_i [|delta_i| >= thr_i] delta_i)."""
    n_models = delta.shape[0]
    n = delta[0].numel()
    if n == 0:
        return 0
    s = _stream(delta, stream)
    partial = _small(np.zeros(_blocks(n), dtype=np.int64), np.int64, s)
    _k().elected_sign_sum[_grid(n) + (s,)](
        _array(delta.reshape(n_models, n), "elected_sign_sum"),
        _small(thresholds, np.float32, s),
        _small(weight, np.float32, s),
        LAUNCH.chunk,
        partial,
    )
    host = partial.copy_to_host(stream=s)
    s.synchronize()
    return int(host.sum())


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
    *,
    stream: Any = None,
) -> torch.Tensor:
    """``fused.ties_model_combine_into`` on the device (TIES ``scope: model`` output pass)."""
    n_models = delta.shape[0]
    n = base.numel()
    s = _stream(delta, stream)
    fstats, istats = _output_stats(n_models, n, s)
    if n:
        _k().model_combine[_grid(n) + (s,)](
            _array(delta.reshape(n_models, n), "ties_model_combine_into"),
            _array(base.reshape(n), "ties_model_combine_into"),
            _small(thresholds, np.float32, s),
            _small(np.full(n_models, np.inf), np.float32, s),
            _small(weight, np.float32, s),
            majority,
            AGGREGATION_CODES[aggregation],
            np.float32(lam),
            lam != 1,
            LAUNCH.chunk,
            _array(out.reshape(n), "ties_model_combine_into"),
            fstats,
            istats,
        )
    _record(stats, fstats, istats, n_models, True, s)
    return out


def warm_up(device: torch.device | str = "cuda") -> None:
    """Compile (or load from numba's cache) every kernel now, on a tiny input, so the first
    real tensor does not pay for it."""
    if not available():
        return
    where = "cpu" if simulated() else device
    delta = torch.ones(1, 8, device=where)
    base = torch.zeros(8, device=where)
    out = torch.empty(8, device=where)
    scratch: dict[str, float] = {}
    task_vectors_(delta, base, [True], scratch)
    refine_histograms(delta, [(0, 0)])
    combine_into(out, delta, base, [(0.0, math.inf)], [1.0], 0.5, True, True, scratch)
    combine_into(out, delta, base, [(0.0, math.inf)], [1.0], 1.0, True, False, scratch)
    elected_sign_sum(delta, [0.0], [1.0])
    ties_model_combine_into(out, delta, base, [0.0], [1.0], 1, "dis-mean", 1.0, scratch)
