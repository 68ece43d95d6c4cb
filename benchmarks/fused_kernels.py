"""Per-tensor TIES on one big tensor: the fused numba kernels vs the torch path.

    python benchmarks/fused_kernels.py [--numel 11534336] [--repeats 5]

Three bf16-valued fine-tunes of one base, one tensor of ``--numel`` float32 elements each
(11.5M = 2816 x 4096, an MLP matrix of the 0.84B benchmark model), ``ties`` with density 0.2 and
weight 1, on the threads torch uses here. Prints, as JSON: the first call's kernel set-up time
(compiling, or loading numba's on-disk cache when an earlier process compiled them), then the best
of ``--repeats`` for each path, and checks the two outputs are bit-identical. These are the
figures quoted in docs/architecture.md and docs/methods/sparse.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from weightsmith.ops import MergeInputs, fused, get_method


def family(numel: int, models: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(numel, generator=g).bfloat16().float()
    stacked = (base + 0.01 * torch.randn(models, numel, generator=g)).bfloat16().float()
    return stacked, base


def ties_once(stacked: torch.Tensor, base: torch.Tensor, use_fused: bool) -> tuple[float, torch.Tensor]:
    os.environ["WEIGHTSMITH_FUSED"] = "1" if use_fused else "0"
    inputs = MergeInputs("t", stacked.clone(), base.clone())  # the op works in place on its inputs
    start = time.perf_counter()
    out = get_method("ties")(inputs, weight=[1.0] * len(stacked), density=[0.2] * len(stacked))
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=2816 * 4096)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not fused.available():
        raise SystemExit("numba is not importable (or WEIGHTSMITH_FUSED=0): nothing to compare")
    stacked, base = family(args.numel)
    start = time.perf_counter()
    fused.warm_up()
    setup = time.perf_counter() - start
    best: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, use_fused in (("fused", True), ("torch", False)):
            seconds, outputs[name] = ties_once(stacked, base, use_fused)
            best[name] = min(best.get(name, float("inf")), seconds)
    identical = torch.equal(outputs["fused"].view(torch.int32), outputs["torch"].view(torch.int32))
    print(json.dumps({
        "numel": args.numel,
        "models": len(stacked),
        "threads": torch.get_num_threads(),
        "kernel_setup_s": round(setup, 2),
        "ties_fused_s": round(best["fused"], 3),
        "ties_torch_s": round(best["torch"], 3),
        "bit_identical": identical,
    }))


if __name__ == "__main__":
    main()
