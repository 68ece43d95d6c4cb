"""CPU time of the spectral merges for one square matrix (default 4096 x 4096, float32).

    python benchmarks/spectral.py --size 4096 --tasks 2 --methods tsv,iso_c,iso_cts,task_arithmetic

Calls each operator directly on random task vectors (no files), once per method, and prints
wall and process CPU seconds (all threads) as JSON lines and a Markdown table. The cost is
dominated by LAPACK SVDs: tsv does T + 2 SVDs of k-wide matrices, iso_c 1, iso_cts T + 3;
task_arithmetic is the no-SVD reference point. ``--threads`` sets torch's intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weightsmith.ops import MergeInputs, get_method  # noqa: E402


def time_method(method: str, size: int, tasks: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(size, size, generator=g)
    models = base + 0.01 * torch.randn(tasks, size, size, generator=g)
    params: dict = {"weight": [1.0] * tasks}
    if method == "task_arithmetic":
        params["lambda"] = 1.0
    inputs = MergeInputs("bench", models, base)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = get_method(method)(inputs, **params)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    assert torch.isfinite(out).all()
    return {"method": method, "size": size, "tasks": tasks, "threads": torch.get_num_threads(),
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--methods", default="tsv,iso_c,iso_cts,task_arithmetic")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods.split(","):
        row = time_method(method, args.size, args.tasks)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{args.tasks} task vectors, one {args.size} x {args.size} float32 matrix, "
          f"{torch.get_num_threads()} threads\n")
    print("| method | wall s | CPU s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['wall_s']} | {r['cpu_s']} |")


if __name__ == "__main__":
    main()
