"""`weightsmith search`: sequential vs Ray actors (1 and 2), on the tiny test case.

    python benchmarks/search_actors.py /tmp/search-bench --trials 13 --popsize 4 --rows 256

Builds a tiny BERT classifier, a noisy copy with a negated head and data labelled by the first
(tests/test_search.py's case, with more rows), then runs the same seeded search locally and on
a fresh local Ray cluster with 1 and 2 actors. Actor start-up (import, inputs opened, model
built) is timed apart from the search. Prints one JSON row per run: seconds, the actors' peak
resident memory, and whether the trial log equals the sequential one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safetensors.torch import load_file, save_file  # noqa: E402

from weightsmith.search.objective import Objective  # noqa: E402
from weightsmith.search.optimizer import search  # noqa: E402
from weightsmith.search.space import Space  # noqa: E402
from weightsmith.testbeds.tiny import make_tiny_bert  # noqa: E402


def build(root: Path, rows: int) -> tuple[dict, Path]:
    good = make_tiny_bert(root / "a", num_labels=2, seed=1)
    bad = root / "b"
    if not (bad / "model.safetensors").exists():
        state = load_file(str(good / "model.safetensors"))
        g = torch.Generator().manual_seed(0)
        noisy = {k: v + 0.3 * torch.randn(v.shape, generator=g) * v.std()
                 if v.is_floating_point() and v.numel() > 1 else v.clone() for k, v in state.items()}
        for k in ("classifier.weight", "classifier.bias"):
            noisy[k] = -state[k]
        bad.mkdir(exist_ok=True)
        for f in good.iterdir():
            if f.name != "model.safetensors":
                (bad / f.name).write_bytes(f.read_bytes())
        save_file(noisy, str(bad / "model.safetensors"), metadata={"format": "pt"})
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "violin", "tiger", "lamp", "zebra"]
    data = root / "val.jsonl"
    lines = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(2, 30))),
              "label": rng.randint(0, 1)} for _ in range(rows)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(good), "parameters": {"weight": 0.2}},
                         {"model": str(bad), "parameters": {"weight": 0.8}}]}
    return recipe, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--trials", type=int, default=13)
    ap.add_argument("--popsize", type=int, default=4)
    ap.add_argument("--rows", type=int, default=256)
    args = ap.parse_args()
    import ray

    from weightsmith.search.ray_pool import RayPool

    args.root.mkdir(parents=True, exist_ok=True)
    recipe, data = build(args.root, args.rows)
    space = Space.parse({"models[0].parameters.weight": [0, 1], "models[1].parameters.weight": [0, 1]})
    options = {"trials": args.trials, "seed": 0, "popsize": args.popsize}

    local_log = args.root / "local.jsonl"
    # Ray gives each actor one CPU (OMP_NUM_THREADS=1): the local run with torch's default
    # threads, and with one thread like an actor.
    for threads in (torch.get_num_threads(), 1):
        torch.set_num_threads(threads)
        started = time.perf_counter()
        objective = Objective(recipe, data, "classification")
        built = time.perf_counter() - started
        local_log.unlink(missing_ok=True)
        started = time.perf_counter()
        search(space, recipe, objective, log_path=local_log, **options)
        print(json.dumps({"run": f"local, {threads} torch threads", "startup_s": round(built, 2),
                          "search_s": round(time.perf_counter() - started, 2),
                          "peak_rss_mb": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024],
                          "load_1min": os.getloadavg()[0]}), flush=True)
        del objective
    for workers in (1, 2):
        ray.init(num_cpus=workers, include_dashboard=False, address="local", log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        started = time.perf_counter()
        pool = RayPool({"recipe": recipe, "data": str(data), "task": "classification"}, workers=workers)
        built = time.perf_counter() - started
        log = args.root / f"ray{workers}.jsonl"
        log.unlink(missing_ok=True)
        started = time.perf_counter()
        search(space, recipe, pool, log_path=log, **options)
        seconds = time.perf_counter() - started
        print(json.dumps({"run": f"ray x{workers}", "startup_s": round(built, 2),
                          "search_s": round(seconds, 2),
                          "peak_rss_mb": [r // 2**20 for r in pool.peak_rss()],
                          "same_log": log.read_text() == local_log.read_text(),
                          "load_1min": os.getloadavg()[0]}), flush=True)
        pool.close()
        ray.shutdown()


if __name__ == "__main__":
    main()
