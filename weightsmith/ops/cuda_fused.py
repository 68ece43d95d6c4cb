"""Device (CUDA) twins of the fused CPU kernels (``weightsmith.ops.fused``): same entry points,
same arguments, same results bit for bit, on tensors that live on a GPU.

The kernels (``_cuda_kernels.py``) are numba.cuda kernels launched on torch CUDA tensors
through the CUDA array interface (zero copy; CuPy arrays share memory with torch the same way,
``torch.as_tensor(cupy_array, device="cuda")``), on torch's current stream, so they order with
the engine's torch work (``with torch.cuda.stream(s):`` moves both). Small parameter and
result arrays come from torch's caching allocator; the report's numbers and the histograms
are read back to the host at the end of each call (a stream synchronization). Under numba's
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
from weightsmith.ops.fused import AGGREGATION_CODES, BLOCK, BUCKETS
from weightsmith.ops.fused_stats import record_input_stats, record_output_stats, returned_histograms

MIN_NUMEL = 1 << 14  # below this a launch costs more than the torch path's few small ops

_IMPORTED = importlib.util.find_spec("numba") is not None


@dataclass(frozen=True)
class Launch:
    """Coordinates per CUDA block (``chunk``). Outputs never depend on it; the report's float64
    sums are reduced per chunk, so their last bits do."""

    chunk: int = BLOCK


LAUNCH = Launch()


def _k() -> Any:
    from weightsmith.ops import _cuda_kernels as cuda_kernels

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
    """The kernels' view of a tensor: zero-copy on a device, the numpy view in the simulator.
    (No stream sync on export: the kernels run on the stream the tensor's work is on.)"""
    if x.device.type == "cuda":
        return _cuda().as_cuda_array(x.detach(), sync=False)
    if simulated():
        return x.detach().numpy()
    raise MergeError(
        f"{name}: the CUDA kernels take tensors on a CUDA device, got one on {x.device}; "
        "move the unit to the device first (--device cuda) or use the CPU fused kernels"
    )


def _blocks(n: int) -> int:
    return (n + LAUNCH.chunk - 1) // LAUNCH.chunk


def selection_bytes(selections: int) -> int:
    """Device histogram memory of exact selection for this many selections (two levels alive
    at most, 65536 int64 buckets each)."""
    return 2 * selections * BUCKETS * 8


def in_place_scratch(n_models: int, dtype: torch.dtype) -> int | None:
    """Device scratch per element of a method whose kernels work in place (float32): none
    beyond the per-block report arrays (under 0.01 byte per coordinate), so 0; elsewhere
    the engine's default (``MergeMethod.scratch_per_element``)."""
    return 0 if dtype == torch.float32 else None


def new_histograms(rows: int, numel: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Histogram accumulators (``rows`` x 65536 int64, on ``device``: the current CUDA device,
    the CPU in the simulator) for ``into`` below, across the row blocks of one tensor; read
    them with ``sum_histograms``. (``numel`` for the CPU twin's signature: int64 counts never
    overflow.)"""
    if device is None:
        device = "cpu" if simulated() else "cuda"
    return torch.zeros((rows, BUCKETS), dtype=torch.int64, device=device)


def sum_histograms(hist: torch.Tensor) -> list[torch.Tensor]:
    """The host int64 histograms, one per row (what ``RadixSelect.absorb`` takes). Ordered
    after the kernels on torch's current stream (the default launch stream)."""
    return list(hist.cpu())


def _launch(kernel: Any, n: int, like: torch.Tensor, *args: Any) -> None:
    """Launch over ``n`` coordinates on torch's current stream of ``like``'s device, so the
    kernels order with the engine's torch work (``with torch.cuda.stream(s):`` moves both)."""
    cuda = _cuda()
    if simulated():
        kernel[_blocks(n), _k().THREADS, cuda.stream()](*args)  # the simulator is synchronous
        return
    index = like.device.index if like.device.index is not None else torch.cuda.current_device()
    with cuda.gpus[index]:  # pragma: no cover - needs a GPU; numba's context on that device
        stream = cuda.external_stream(torch.cuda.current_stream(like.device).cuda_stream)
        kernel[_blocks(n), _k().THREADS, stream](*args)


def _in_place(x: torch.Tensor, name: str) -> None:
    # reshape() of a non-contiguous tensor is a copy: writes would not reach the caller's tensor
    if not x.is_contiguous():
        raise MergeError(f"{name}: the CUDA kernels write in place and need a contiguous tensor")


def _small(values: Any, dtype: torch.dtype, like: torch.Tensor) -> Any:
    """A small parameter array beside ``like`` (torch's caching allocator on a device: no
    cudaMalloc per call), as the kernels see it."""
    return _array(torch.tensor(np.asarray(values), dtype=dtype, device=like.device), "parameters")


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=like.device)


def task_vectors_(
    models: torch.Tensor,
    base: torch.Tensor,
    histograms: list[bool],
    stats: dict[str, float] | None,
    into: torch.Tensor | None = None,
) -> list[torch.Tensor | None]:
    """``fused.task_vectors_`` on the device: delta_i = models[i] - base in place, the input
    statistics into ``stats`` (None: skipped), and the first-level histograms of the models
    with ``histograms[i]`` (returned on the host, or added into ``into``)."""
    n_models = models.shape[0]
    n = base.numel()
    _in_place(models, "task_vectors_")
    if into is not None:
        hist = into
    else:
        hist = _zeros((n_models if any(histograms) else 1, BUCKETS), torch.int64, models)
    nb = max(_blocks(n), 1)
    fstats = _zeros((nb, 1 + 2 * n_models), torch.float64, models)
    istats = _zeros((nb, n_models), torch.int64, models)
    if n:
        _launch(
            _k().task_vectors, n, models,
            _array(models.reshape(n_models, n), "task_vectors_"), _array(base.reshape(n), "task_vectors_"),
            _small(histograms, torch.uint8, models), stats is not None, LAUNCH.chunk,
            _array(hist, "histograms"), _array(fstats, "statistics"), _array(istats, "statistics"),
        )
    if stats is not None:  # the per-block partials, summed on the host
        record_input_stats(stats, fstats.cpu().numpy(), istats.cpu().numpy(), n, n_models)
    return returned_histograms(histograms, into, lambda: sum_histograms(hist))


def subtract_(models: torch.Tensor, base: torch.Tensor) -> None:
    """delta_i = models[i] - base in place, nothing else (statistics passes)."""
    task_vectors_(models, base, [False] * models.shape[0], None)


def refine_histograms(
    delta: torch.Tensor, selections: list[tuple[int, int]], into: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """``fused.refine_histograms`` on the device: for each (model i, top digit) the histogram
    of the low 16 bits of the |delta_i| keys under that digit."""
    if not selections:
        return []
    n_models = delta.shape[0]
    n = delta[0].numel()
    hist = into if into is not None else _zeros((len(selections), BUCKETS), torch.int64, delta)
    if n:
        _launch(
            _k().refine, n, delta,
            _array(delta.reshape(n_models, n).view(torch.int32), "refine_histograms"),
            _small([i for i, _ in selections], torch.int64, delta),
            _small([d for _, d in selections], torch.int32, delta),
            LAUNCH.chunk,
            _array(hist, "histograms"),
        )
    return [] if into is not None else sum_histograms(hist)


def _output_stats(n_models: int, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nb = max(_blocks(n), 1)
    return _zeros((nb, n_models + 2), torch.float64, like), _zeros((nb, n_models + 3), torch.int64, like)


def _record(
    stats: dict[str, float], fstats: torch.Tensor, istats: torch.Tensor, n_models: int, elected: bool
) -> None:
    record_output_stats(stats, fstats.cpu().numpy(), istats.cpu().numpy(), n_models, elected)


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
    """``fused.combine_into`` on the device (keep band, weighting, sign election, agreement,
    normalized sum, lambda, base, output statistics)."""
    n_models = delta.shape[0]
    n = base.numel()
    f32 = np.float32
    wsum = sum(weight)
    _in_place(out, "combine_into")
    fstats, istats = _output_stats(n_models, n, delta)
    if n:
        _launch(
            _k().combine, n, delta,
            _array(delta.reshape(n_models, n), "combine_into"),
            _array(base.reshape(n), "combine_into"),
            _small([k[0] for k in keep], torch.float32, delta),
            _small([k[1] for k in keep], torch.float32, delta),
            _small(weight, torch.float32, delta),
            f32(lam),
            lam != 1,
            normalize,
            consensus,
            f32(1.0 if abs(wsum) < 1e-8 else wsum),
            LAUNCH.chunk,
            _array(out.reshape(n), "combine_into"),
            _array(fstats, "statistics"),
            _array(istats, "statistics"),
        )
    _record(stats, fstats, istats, n_models, consensus)
    return out


def elected_sign_sum(delta: torch.Tensor, thresholds: list[float], weight: list[float]) -> int:
    """Exact sum over coordinates of sign(sum_i w_i [|delta_i| >= thr_i] delta_i)."""
    n_models = delta.shape[0]
    n = delta[0].numel()
    if n == 0:
        return 0
    partial = _zeros((_blocks(n),), torch.int64, delta)
    _launch(
        _k().elected_sign_sum, n, delta,
        _array(delta.reshape(n_models, n), "elected_sign_sum"),
        _small(thresholds, torch.float32, delta),
        _small(weight, torch.float32, delta),
        LAUNCH.chunk,
        _array(partial, "statistics"),
    )
    return int(partial.sum())


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
    """``fused.ties_model_combine_into`` on the device (TIES ``scope: model`` output pass)."""
    n_models = delta.shape[0]
    n = base.numel()
    _in_place(out, "ties_model_combine_into")
    fstats, istats = _output_stats(n_models, n, delta)
    if n:
        _launch(
            _k().model_combine, n, delta,
            _array(delta.reshape(n_models, n), "ties_model_combine_into"),
            _array(base.reshape(n), "ties_model_combine_into"),
            _small(thresholds, torch.float32, delta),
            _small(np.full(n_models, np.inf), torch.float32, delta),
            _small(weight, torch.float32, delta),
            majority,
            AGGREGATION_CODES[aggregation],
            np.float32(lam),
            lam != 1,
            LAUNCH.chunk,
            _array(out.reshape(n), "ties_model_combine_into"),
            _array(fstats, "statistics"),
            _array(istats, "statistics"),
        )
    _record(stats, fstats, istats, n_models, True)
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
