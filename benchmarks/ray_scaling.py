"""Local executor vs `--executor ray` with 1 and 2 worker CPUs, on synthetic checkpoints.

    python benchmarks/ray_scaling.py .bench/ray --params 0.05B --models 3 --shard 25MB
    python benchmarks/ray_scaling.py .bench/ray --workers 2 --modes shared,streamed

``--modes streamed`` runs `--ray-no-shared-fs` (shards streamed back to the driver); each row
gives the driver's peak resident memory during that run: heap (anon) and the pages of Ray's
shared-memory object store mapped into it (shmem).

Builds (or reuses) the checkpoints with make_checkpoints.py, then merges them with task
arithmetic and with TIES ``scope: model`` (statistics passes reduced over the cluster),
locally and on a fresh local Ray cluster per worker count. Cluster start-up is not counted
(a real cluster is already running); the per-run times include shipping the plan, the tasks'
start and the workers' imports. Every output is checked byte for byte against the local one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from itertools import product
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import weightsmith  # noqa: E402


def same_shards(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    return names == sorted(p.name for p in b.glob("*.safetensors")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


class MemoryPeaks:
    """The driver's peak anonymous (heap) and shared (Ray object store pages mapped here)
    resident memory during a run, sampled every 20 ms from /proc/self/status."""

    def __enter__(self) -> MemoryPeaks:
        self.peaks = {"RssAnon": 0, "RssShmem": 0}
        self._read()
        self.start = dict(self.peaks)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.02):
            self._read()

    def _read(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in self.peaks:
                self.peaks[key] = max(self.peaks[key], int(line.split()[1]))

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def row(self) -> dict[str, str]:
        """Peak and growth over the run's start, per kind (the process keeps what earlier runs touched)."""
        return {f"driver_{k[3:].lower()}": f"peak {v // 1024} MB, +{(v - self.start[k]) // 1024} MB"
                for k, v in self.peaks.items()}


def recipes(root: Path, models: int, names: str = "task_arithmetic,ties_model") -> dict[str, dict]:
    fts = [{"model": str(root / f"ft{i}"), "parameters": {"weight": 0.5, "density": 0.3}}
           for i in range(models - 1)]
    common = {"base_model": str(root / "base"), "models": fts, "dtype": "float32", "out_dtype": "bfloat16"}
    every = {
        "task_arithmetic": {"merge_method": "task_arithmetic", **common},
        "ties_model": {"merge_method": "ties", "parameters": {"scope": "model"}, **common},
    }
    return {name: every[name] for name in names.split(",")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--params", default="0.05B")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--shard", default="25MB", help="output shard size: one Ray task per shard")
    ap.add_argument("--budget", default="256MB", help="memory budget (per worker on Ray)")
    ap.add_argument("--workers", default="1,2", help="Ray worker CPUs, comma-separated")
    ap.add_argument("--recipes", default="task_arithmetic,ties_model", help="comma-separated")
    ap.add_argument("--chunk", default=None, help="streamed mode: bytes per chunk (default 8MiB)")
    ap.add_argument("--modes", default="shared", help="shared (workers write OUT), streamed, or both")
    args = ap.parse_args()
    import ray

    from weightsmith.engine import ray_stream
    from weightsmith.units import parse_size

    if args.chunk:
        ray_stream.CHUNK_BYTES = parse_size(args.chunk)

    here = Path(__file__).resolve().parent
    subprocess.run([sys.executable, str(here / "make_checkpoints.py"), str(args.root), "--params",
                    args.params, "--models", str(args.models)], check=True)
    out = args.root / "out"
    rows = []
    options = {"memory_budget": args.budget, "out_shard_size": args.shard, "fsync": False, "overwrite": True}
    for name, recipe in recipes(args.root, args.models, args.recipes).items():
        started = time.perf_counter()
        with MemoryPeaks() as memory:
            local = weightsmith.merge(recipe, out / f"{name}-local", **options)
        rows.append({"recipe": name, "executor": "local", "workers": 1,
                     "seconds": round(time.perf_counter() - started, 2), **memory.row(),
                     "shards": len(set(json.loads((local.out / "model.safetensors.index.json").read_text())
                                       ["weight_map"].values()))})
    for workers in [int(w) for w in args.workers.split(",")]:
        ray.init(num_cpus=workers, include_dashboard=False, address="local", log_to_driver=False)
        try:
            # Each run twice, the second one counted: the first also pays the workers' start.
            chosen = recipes(args.root, args.models, args.recipes).items()
            runs = product(chosen, args.modes.split(","), (0, 1))
            for (name, recipe), mode, counted in runs:
                started = time.perf_counter()
                with MemoryPeaks() as memory:
                    result = weightsmith.merge(recipe, out / f"{name}-ray{workers}-{mode}", executor="ray",
                                               ray_shared_fs=mode != "streamed", **options)
                seconds = time.perf_counter() - started
                if not counted:
                    continue
                rows.append({"recipe": name, "executor": "ray", "workers": workers, "mode": mode,
                             "seconds": round(seconds, 2), **memory.row(),
                             "passes": result.stats.global_passes,
                             "identical": same_shards(result.out, out / f"{name}-local")})
        finally:
            ray.shutdown()
    for row in rows:
        print(json.dumps(row))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
