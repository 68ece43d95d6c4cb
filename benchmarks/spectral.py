"""CPU time of the spectral merges for one square matrix (default 4096 x 4096, float32).

    python benchmarks/spectral.py --size 4096 --tasks 2 --methods tsv,iso_c,iso_cts,task_arithmetic
    python benchmarks/spectral.py --methods tsv,iso_c,iso_cts,extract_lora --device cuda

Calls each operator directly on random task vectors (no files), once per method, and prints
wall and process CPU seconds (all threads) as JSON lines and a Markdown table. The cost is
dominated by LAPACK SVDs: tsv does T + 2 SVDs of k-wide matrices, iso_c 1, iso_cts T + 3;
task_arithmetic is the no-SVD reference point; ``extract_lora`` is extract-lora's step for one
difference (``--rank``, default 64: the randomized SVD its ``--svd auto`` picks, and the
relative error). ``--threads`` sets torch's intra-op threads. ``--device cuda`` puts the
matrices on the GPU first (torch.linalg runs there; wall time after a synchronize; CPU seconds
are then the host's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weightsmith.lora_plan import pick_method  # noqa: E402
from weightsmith.ops import MergeInputs, get_method  # noqa: E402
from weightsmith.ops.lowrank import relative_error, truncated_svd  # noqa: E402


def time_method(
    method: str, size: int, tasks: int, seed: int = 0, device: str = "cpu", rank: int = 64
) -> dict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(size, size, generator=g).to(device)
    models = base + 0.01 * torch.randn(tasks, size, size, generator=g).to(device)
    if method == "extract_lora":
        return _timed(method, size, tasks, device, lambda: _extract(models[0] - base, rank))
    params: dict = {"weight": [1.0] * tasks}
    if method == "task_arithmetic":
        params["lambda"] = 1.0
    inputs = MergeInputs("bench", models, base)
    return _timed(method, size, tasks, device, lambda: get_method(method)(inputs, **params))


def _extract(delta: torch.Tensor, rank: int) -> torch.Tensor:
    low = truncated_svd(delta, rank, pick_method("auto", rank, tuple(delta.shape)))
    return torch.tensor(relative_error(delta, low.b, low.a))


def _timed(method: str, size: int, tasks: int, device: str, fn) -> dict:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    assert torch.isfinite(out).all()
    return {"method": method, "size": size, "tasks": tasks, "threads": torch.get_num_threads(),
            "device": device, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--methods", default="tsv,iso_c,iso_cts,task_arithmetic")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--rank", type=int, default=64, help="extract_lora: the adapter's rank")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods.split(","):
        row = time_method(method, args.size, args.tasks, device=args.device, rank=args.rank)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{args.tasks} task vectors, one {args.size} x {args.size} float32 matrix on {args.device}, "
          f"{torch.get_num_threads()} threads\n")
    print("| method | wall s | CPU s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['wall_s']} | {r['cpu_s']} |")


if __name__ == "__main__":
    main()
