"""DELLA's per-row magnitude ranks: the numba radix kernel vs torch's stable argsort.

    python benchmarks/della_ranks.py [--shapes 32000x2048,5632x2048] [--della 2816x4096] [--models 3]

For each ``--shapes`` float32 tensor (|N(0, 0.02)|, as task-vector magnitudes), the CPU time
(``time.process_time``: all threads of this process, so it does not flatter a parallel kernel
and is less skewed than wall time on a shared machine) and wall time of ``keep_probabilities``
on the torch path and on the kernel, and whether the two outputs are bit-identical. Then the
whole ``della`` op on ``--models`` bf16-valued fine-tunes of one ``--della`` tensor, both ways,
checked bit-identical. The first kernel call (compiling or loading numba's cache) is timed apart.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from unittest import mock

import torch

from weightsmith.ops import MergeInputs, get_method, row_ranks
from weightsmith.ops.della import keep_probabilities


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, out


def both_paths(fn: Callable[[], torch.Tensor]) -> dict:
    with mock.patch.object(row_ranks, "kernel_applies", lambda x: False):
        t_cpu, t_wall, t_out = timed(fn)
    k_cpu, k_wall, k_out = timed(fn)
    return {
        "torch_cpu_s": round(t_cpu, 3),
        "torch_wall_s": round(t_wall, 3),
        "kernel_cpu_s": round(k_cpu, 3),
        "kernel_wall_s": round(k_wall, 3),
        "cpu_speedup": round(t_cpu / max(k_cpu, 1e-9), 1),
        "bit_identical": torch.equal(t_out, k_out),
    }


def della_once(stacked: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    n = len(stacked)
    inputs = MergeInputs("t", stacked.clone(), base.clone(), generator=torch.Generator().manual_seed(0))
    return get_method("della")(
        inputs, weight=[1.0] * n, density=[0.4] * n, epsilon=[0.15] * n, normalize=True, rescale=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32000x2048,5632x2048")
    parser.add_argument("--della", default="2816x4096")
    parser.add_argument("--models", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    cpu, wall, _ = timed(lambda: row_ranks.kernel_ranks(torch.rand(4, 64)))
    report: dict = {"threads": torch.get_num_threads(), "first_call_cpu_s": round(cpu, 3),
                    "first_call_wall_s": round(wall, 3)}
    for text in args.shapes.split(","):
        shape = tuple(int(s) for s in text.split("x"))
        mags = torch.randn(shape, generator=g).mul_(0.02).abs_()
        report[f"keep_probabilities {text}"] = both_paths(partial(keep_probabilities, mags, 0.4, 0.15))
    shape = tuple(int(s) for s in args.della.split("x"))
    base = torch.randn(shape, generator=g).bfloat16().float()
    stacked = (base + 0.01 * torch.randn(args.models, *shape, generator=g)).bfloat16().float()
    report[f"della {args.models} x {args.della}"] = both_paths(lambda: della_once(stacked, base))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
