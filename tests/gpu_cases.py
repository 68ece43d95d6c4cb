"""Cases shared by tests/test_gpu_sim.py (CUDA kernels in numba's simulator, in a subprocess)
and tests/test_gpu.py (the same kernels on a real device): each case runs a kernel module
(``ops.fused`` or ``ops.cuda_fused``) on small deterministic inputs and returns what it
produced (tensors moved to the CPU, statistics, counts), for a bit-for-bit comparison.

As a script (``python tests/gpu_cases.py OUT.pt CASE...``) it runs the cases on
``ops.cuda_fused`` and saves the results with ``torch.save``; the caller sets
``NUMBA_ENABLE_CUDASIM=1`` in its environment, so numba.cuda is the simulator from the start.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

INF = math.inf
CHUNK = 256  # coordinates per CUDA block in the tests: several blocks and a ragged last one


def family(n: int, models: int = 3, seed: int = 0, scale: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16-valued float32 base and models: +0/-0 in the base, zero task-vector entries, and
    the many equal magnitudes bf16 rounding makes (ties at every threshold)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).bfloat16().float()
    base[:20] = 0.0
    base[20:40] = -0.0
    stacked = (base + scale * torch.randn(models, n, generator=g)).bfloat16().float()
    stacked[0, 60:200] = base[60:200]
    if models > 1:
        stacked[1, :40] = base[:40]
    return stacked, base


def tie_family(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Task vectors from {0, +-1, +-2, +-3}: every threshold falls inside a run of ties."""
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(n)
    stacked = torch.randint(-3, 4, (3, n), generator=g).float()
    return stacked, base


# --------------------------------------------------------------------------- kernel cases
def _to(x: torch.Tensor, device: str) -> torch.Tensor:
    return x.to(device).contiguous()


def _host(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, list):
        return [_host(v) for v in value]
    if isinstance(value, dict):
        return {k: _host(v) for k, v in value.items()}
    return value


def _top_digit(hist: torch.Tensor) -> int:
    return int(torch.nonzero(hist).max())  # the largest occupied bucket: refine inside it


def kernel_task_vectors(k: Any, device: str, stacked: torch.Tensor, base: torch.Tensor) -> dict:
    models, base = _to(stacked, device), _to(base, device)
    stats: dict[str, float] = {}
    want = [True, False, True][: models.shape[0]]
    first = k.task_vectors_(models, base, want, stats)
    picks = [(i, _top_digit(first[i])) for i in range(len(want)) if want[i]]
    picks += [(0, 0)]  # the zero bucket's refinement too (zeros and subnormals)
    second = k.refine_histograms(models, picks)
    return {"delta": models, "first": first, "second": second, "stats": stats}


def kernel_combine(
    k: Any, device: str, stacked: torch.Tensor, base: torch.Tensor, keep: list, weight: list,
    lam: float, normalize: bool, consensus: bool,
) -> dict:
    delta = _to(stacked - base, device)
    out = torch.empty_like(delta[0])
    stats: dict[str, float] = {}
    k.combine_into(out, delta, _to(base, device), keep, weight, lam, normalize, consensus, stats)
    return {"out": out, "stats": stats}


def kernel_model_scope(
    k: Any, device: str, stacked: torch.Tensor, base: torch.Tensor, thresholds: list, weight: list,
    majority: int, aggregation: str, lam: float,
) -> dict:
    delta = _to(stacked - base, device)
    out = torch.empty_like(delta[0])
    stats: dict[str, float] = {}
    signs = k.elected_sign_sum(delta, thresholds, weight)
    k.ties_model_combine_into(
        out, delta, _to(base, device), thresholds, weight, majority, aggregation, lam, stats
    )
    return {"out": out, "stats": stats, "signs": signs}


def _nan_family() -> tuple[torch.Tensor, torch.Tensor]:
    stacked, base = family(700)
    stacked[1, 333] = math.nan
    stacked[2, 500] = math.inf
    return stacked, base


KERNEL_CASES: dict[str, Callable[[Any, str], dict]] = {
    "tv_odd_size": lambda k, d: kernel_task_vectors(k, d, *family(1001)),
    "tv_all_zero": lambda k, d: kernel_task_vectors(k, d, torch.zeros(3, 300), torch.zeros(300)),
    "tv_ties": lambda k, d: kernel_task_vectors(k, d, *tie_family(600)),
    "tv_nan_guard": lambda k, d: kernel_task_vectors(k, d, *_nan_family()),
    "combine_ties_band": lambda k, d: kernel_combine(
        k, d, *family(1001), [(0.005, 0.02), (0.0, INF), (0.001, INF)], [0.3, 0.5, 0.2], 1.0, True, True
    ),
    "combine_negative_zero_weights_lambda": lambda k, d: kernel_combine(
        k, d, *family(777), [(0.004, INF), (0.002, INF), (0.0, INF)], [0.3, -0.5, 0.0], -1.5, True, True
    ),
    "combine_no_normalize": lambda k, d: kernel_combine(
        k, d, *family(513), [(0.004, INF), (0.0, INF), (0.01, INF)], [0.3, -0.5, 1.2], 1.0, False, True
    ),
    "combine_linear_normalized": lambda k, d: kernel_combine(
        k, d, *family(600), [(0.0, INF)] * 3, [0.3, 0.5, 0.2], 2.0, True, False
    ),
    "combine_zero_weight_sum": lambda k, d: kernel_combine(
        k, d, *family(300), [(0.0, INF)] * 3, [0.5, -0.5, 0.0], 1.0, True, False
    ),
    "combine_empty_band_and_ties": lambda k, d: kernel_combine(
        k, d, *tie_family(700), [(INF, INF), (2.0, 2.0), (3.0, INF)], [1.0, 1.0, 1.0], 1.0, True, True
    ),
    "combine_all_zero": lambda k, d: kernel_combine(
        k, d, torch.zeros(2, 300), torch.zeros(300), [(0.0, INF)] * 2, [1.0, 1.0], 0.5, True, True
    ),
    "combine_nan_kept": lambda k, d: kernel_combine(
        k, d, *_nan_family(), [(0.004, INF)] * 3, [0.3, 0.5, 0.2], 1.0, True, True
    ),
    "model_scope_mean": lambda k, d: kernel_model_scope(
        k, d, *family(900), [0.004, 0.0, 0.01], [1.0, 0.5, 2.0], -1, "dis-mean", 1.0
    ),
    "model_scope_sum_lambda": lambda k, d: kernel_model_scope(
        k, d, *tie_family(500), [2.0, 0.0, 3.0], [1.0, -0.5, 2.0], 1, "dis-sum", 0.6
    ),
    "model_scope_max_zero_majority": lambda k, d: kernel_model_scope(
        k, d, *tie_family(500), [1.0, 2.0, 0.0], [1.0, 1.0, 1.0], 0, "dis-max", 0.6
    ),
}


# --------------------------------------------------------------------------- method cases
class Counting:
    """A kernel module whose entry-point calls are counted (``calls``), so a case shows that
    the kernels, not the torch path, did the work, and the same number of times."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.module, name)
        if not callable(value) or name in ("available", "usable"):
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return value(*args, **kwargs)

        return counted


@contextlib.contextmanager
def kernels_in_methods(k: Any | None) -> Iterator[Counting | None]:
    """Route the sparse methods' fused calls (ops/sparse/combine.py, ops/sparse/band_statistics.py,
    ops/ties.py) to kernel module ``k`` at any tensor size (None: the torch path), as the engine's
    ``--kernels`` will."""
    from weightsmith.ops import cuda_fused, fused, ties
    from weightsmith.ops.sparse import band_statistics, combine

    users = (combine, band_statistics, ties)
    env = os.environ.get("WEIGHTSMITH_FUSED")
    saved = ([m.fused for m in users], fused.MIN_NUMEL, cuda_fused.MIN_NUMEL)
    counting = None if k is None else Counting(k)
    try:
        if k is None:
            os.environ["WEIGHTSMITH_FUSED"] = "0"
        else:
            for m in users:
                m.fused = counting
            fused.MIN_NUMEL = cuda_fused.MIN_NUMEL = 0
        yield counting
    finally:
        for m, module in zip(users, saved[0]):
            m.fused = module
        fused.MIN_NUMEL, cuda_fused.MIN_NUMEL = saved[1], saved[2]
        if env is None:
            os.environ.pop("WEIGHTSMITH_FUSED", None)
        else:
            os.environ["WEIGHTSMITH_FUSED"] = env


def run_method(
    k: Any | None, device: str, method: str, stacked: torch.Tensor, base: torch.Tensor, **params: Any
) -> dict:
    from weightsmith.ops import MergeInputs, get_method

    with kernels_in_methods(k) as counting:
        g = torch.Generator(device=device).manual_seed(7)
        inputs = MergeInputs("t", _to(stacked, device), _to(base, device), generator=g)
        out = get_method(method)(inputs, **params)
        calls = counting.calls if counting is not None else None
        return {"out": out, "stats": dict(inputs.stats), "calls": calls}


def run_model_scope(
    k: Any | None, device: str, stacked: torch.Tensor, base: torch.Tensor, **params: Any
) -> dict:
    """TIES ``scope: model``: the statistics passes (two radix levels and the majority sign,
    over two row blocks as the engine may split them), then the output pass."""
    from weightsmith.ops import MergeInputs, get_method
    from weightsmith.ops.ties import TiesModelStatistics

    n = base.numel()
    with kernels_in_methods(k) as counting:
        st = TiesModelStatistics(params["density"], torch.float32)
        while st.wants_pass():
            total = None
            for block in (slice(0, n // 3), slice(n // 3, n)):
                inputs = MergeInputs("t", _to(stacked[:, block], device), _to(base[block], device))
                part = st.collect(inputs, weight=params["weight"])
                total = part if total is None else st.combine(total, part)
            st.absorb(total)
        ctx = st.result()
        inputs = MergeInputs("t", _to(stacked, device), _to(base, device), context=ctx)
        out = get_method("ties")(inputs, scope="model", **params)
        return {
            "out": out, "stats": dict(inputs.stats), "thresholds": list(ctx.thresholds),
            "majority": ctx.majority_sign, "calls": counting.calls if counting is not None else None,
        }


W3 = [0.3, 0.5, 0.2]
METHOD_CASES: dict[str, tuple[str, Callable[[], tuple], dict]] = {
    "ties": ("ties", lambda: family(1001), dict(weight=W3, density=[0.2, 0.5, 1.0])),
    "ties_tiny_density_lambda": (
        "ties", lambda: family(700), {"weight": [1.0] * 3, "density": [0.001, 0.01, 0.3], "lambda": 0.7}
    ),
    "ties_negative_weights_no_normalize": (
        "ties", lambda: tie_family(600),
        dict(weight=[0.3, -0.5, 1.2], density=[0.1, 0.5, 0.9], normalize=False),
    ),
    "breadcrumbs": (
        "breadcrumbs", lambda: family(800), dict(weight=W3, density=[0.2, 0.5, 0.9], gamma=[0.01, 0.05, 0.2])
    ),
    "breadcrumbs_ties_empty_band": (
        "breadcrumbs_ties", lambda: family(600),
        dict(weight=W3, density=[0.001, 0.2, 1.0], gamma=[0.0, 0.3, 0.0]),
    ),
    "dare_ties": ("dare_ties", lambda: family(700), dict(weight=W3, density=[0.2, 0.5, 1.0])),
    "dare_linear": (
        "dare_linear", lambda: family(500), {"weight": W3, "density": [0.3, 0.3, 1.0], "lambda": 2.0}
    ),
}

MODEL_SCOPE_CASES: dict[str, tuple[Callable[[], tuple], dict]] = {
    "ties_model_scope": (lambda: family(900), dict(weight=[1.0, 0.5, 2.0], density=[0.2, 1.0, 0.05])),
    "ties_model_scope_max": (
        lambda: tie_family(700), {"weight": [1.0] * 3, "density": [0.3, 0.6, 0.1], "aggregation": "dis-max"}
    ),
}

CASES = [*KERNEL_CASES, *METHOD_CASES, *MODEL_SCOPE_CASES]


def run_case(name: str, k: Any | None, device: str) -> dict:
    """Case ``name`` with kernel module ``k`` (None: the torch path) on ``device``; results on
    the host."""
    if name in KERNEL_CASES:
        return _host(KERNEL_CASES[name](k, device))
    if name in METHOD_CASES:
        method, make, params = METHOD_CASES[name]
        return _host(run_method(k, device, method, *make(), **params))
    make, params = MODEL_SCOPE_CASES[name]
    return _host(run_model_scope(k, device, *make(), **params))


def assert_same(got: Any, ref: Any, where: str = "") -> None:
    """Bit for bit, recursively: float tensors by their bits (NaN only by position: a GPU writes
    the canonical NaN), counts exactly, the report's float64 sums of squares to 1e-9 relative
    (their reduction order differs from the CPU's, see ops/_cuda_kernels.py)."""
    if isinstance(ref, dict):
        assert set(got) == set(ref), f"{where}: keys differ: {sorted(set(got) ^ set(ref))}"
        for key in ref:
            assert_same(got[key], ref[key], f"{where}[{key}]")
    elif isinstance(ref, list):
        assert len(got) == len(ref), where
        for i, (a, b) in enumerate(zip(got, ref)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(ref, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == ref.shape and got.dtype == ref.dtype, where
        if ref.dtype.is_floating_point:
            nan = torch.isnan(ref)
            assert torch.equal(torch.isnan(got), nan), f"{where}: NaN positions differ"
            a, b = got[~nan].view(torch.int32), ref[~nan].view(torch.int32)
            bad = torch.nonzero(a != b).flatten()
            assert bad.numel() == 0, f"{where}: {bad.numel()} values differ, first at {bad[:5].tolist()}"
        else:
            assert torch.equal(got, ref), f"{where}: counts differ"
    elif isinstance(ref, float) and ("sq_" in where):
        both_nan = math.isnan(got) and math.isnan(ref)
        assert both_nan or math.isclose(got, ref, rel_tol=1e-9, abs_tol=1e-300), f"{where}: {got} != {ref}"
    elif isinstance(ref, float) and math.isnan(ref):
        assert math.isnan(got), where
    else:
        assert got == ref, f"{where}: {got!r} != {ref!r}"


def main(argv: list[str]) -> None:
    from weightsmith.ops import cuda_fused

    if not cuda_fused.simulated() and not torch.cuda.is_available():
        raise SystemExit("neither NUMBA_ENABLE_CUDASIM=1 nor a CUDA device")
    device = "cpu" if cuda_fused.simulated() else "cuda"
    cuda_fused.LAUNCH = cuda_fused.Launch(chunk=CHUNK)
    # The simulator runs each CUDA thread as a Python thread and polls them at every
    # syncthreads: a short GIL switch interval makes those hand-offs cheap.
    sys.setswitchinterval(5e-5)
    out_path, names = Path(argv[0]), argv[1:] or CASES
    torch.save({name: run_case(name, cuda_fused, device) for name in names}, out_path)


if __name__ == "__main__":
    main(sys.argv[1:])
