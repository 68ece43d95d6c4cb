"""Speed and memory of weightsmith against mergekit and the byte-moving floor, in one run.

    python benchmarks/run.py --params 0.84B --models 4 --methods task_arithmetic,linear,ties
    python benchmarks/run.py --params 0.84B --models 4 --methods tsv,iso_c,iso_cts --tools weightsmith
    python benchmarks/run.py --params 0.84B --models 4 --methods extract_lora --tools weightsmith

Methods: task_arithmetic, linear, ties, ties_model, and della, della_linear, sce, nuslerp,
multislerp, karcher, nearswap, ram, ramplus_tl, arcee_fusion, passthrough (``OTHER_METHODS``).

``extract_lora`` (weightsmith only; not in the default --methods) times ``weightsmith
extract-lora ft0 base --rank R`` (``--extract-rank``, default 64: randomized SVDs per matrix;
``--extract-args`` adds options, e.g. ``--device cuda``); its GB/s counts the two inputs read.

Builds (or reuses) synthetic Llama-shaped bf16 checkpoints with ``make_checkpoints.py``, then
for each method runs the floor, weightsmith and mergekit (when found) on the same inputs,
alternating tools within each repeat so that machine noise hits all of them alike. Each run is
a fresh process; wall time, CPU time and peak RSS come from ``wait4``. The page cache is
warmed before every run, so all tools read from memory, as the issue's targets assume.

mergekit is looked up at ``--mergekit`` or ``.bench/mergekit-venv/bin/mergekit-yaml`` (install
it in its own venv: ``python -m venv .bench/mergekit-venv && .bench/mergekit-venv/bin/pip
install torch==2.13.0 mergekit==0.1.5``). Results go to ``--out`` as JSON and are printed as
a Markdown table for the README's Performance section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from make_checkpoints import build  # noqa: E402

sys.path.insert(0, str(ROOT))
from weightsmith.units import format_size, parse_size  # noqa: E402

# Spectral merges (docs/methods/spectral.md); not in the default --methods.
SPECTRAL = ("tsv", "iso_c", "iso_cts")
# Not a merge: FINE_TUNE - BASE factored per matrix (weightsmith/lora_extraction.py).
EXTRACT = "extract_lora"


def recipe(method: str, folders: list[Path]) -> dict:
    base, models = folders[0], folders[1:]
    weights = [round(1.0 / len(models), 4)] * len(models)
    spec = {
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    if method == "linear":
        spec["models"] = [{"model": str(m), "parameters": {"weight": 1.0}} for m in folders]
        del spec["base_model"]
        return {"merge_method": "linear", **spec}
    if method == "task_arithmetic":
        return {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0}, **spec}
    if method in ("ties", "ties_model"):
        for m in spec["models"]:
            m["parameters"]["density"] = 0.2
        params: dict = {"lambda": 1.0}
        if method == "ties_model":
            params["scope"] = "model"
        return {"merge_method": "ties", "parameters": params, **spec}
    if method in OTHER_METHODS:
        return other_method_recipe(method, spec)
    if method in SPECTRAL:
        # One SVD per matrix per task (and a few more): far slower than the byte floor, and
        # mergekit 0.1.5 has none of them. CPU time per 4096 x 4096 matrix: benchmarks/spectral.py.
        return {"merge_method": method, "parameters": {"alpha": 1.0}, **spec}
    raise SystemExit(f"unknown benchmark method {method}")


# The rest of mergekit's methods: global parameters, and how many fine-tunes each takes
# (None: all) and whether it keeps the base, beside the same inputs as above.
OTHER_METHODS: dict[str, tuple[dict, int | None, bool]] = {
    "della": ({"density": 0.4, "epsilon": 0.1}, None, True),
    "della_linear": ({"density": 0.4, "epsilon": 0.1}, None, True),
    "sce": ({"select_topk": 0.2}, None, True),
    "nuslerp": ({"nuslerp_flatten": False}, 2, True),
    "multislerp": ({}, None, True),
    "karcher": ({}, None, False),
    "nearswap": ({"t": 0.001}, 1, True),
    "ram": ({}, None, True),
    "ramplus_tl": ({}, None, True),
    "arcee_fusion": ({}, 1, True),
    "passthrough": ({}, 1, False),
}
WEIGHTED = ("della", "della_linear", "nuslerp", "multislerp")  # the others take no `weight`


def other_method_recipe(method: str, spec: dict) -> dict:
    params, count, with_base = OTHER_METHODS[method]
    out = dict(spec)
    models = spec["models"][:count] if count else spec["models"]
    if method not in WEIGHTED:
        models = [{"model": m["model"]} for m in models]
    out["models"] = models
    if not with_base:
        del out["base_model"]
    return {"merge_method": method, "parameters": dict(params), **out}


def warm(folders: list[Path]) -> None:
    for folder in folders:
        for shard in folder.glob("*.safetensors"):
            with open(shard, "rb") as f:
                while f.read(64 * 2**20):
                    pass


# Linux keeps a process's peak RSS across execve, so a tool started straight from this
# (torch-importing, checkpoint-building) process would report at least this process's own
# peak. A tiny launcher forks the tool from a fresh small interpreter and reports its rusage.
LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        launch = [sys.executable, "-c", LAUNCHER, report.name, *cmd]
        proc = subprocess.run(launch, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.decode()[-2000:]}")
        figures = json.loads(Path(report.name).read_text())
    return {
        "wall_s": round(figures["wall"], 2),
        "cpu_s": round(figures["cpu"], 2),
        "peak_rss_bytes": figures["maxrss_kb"] * 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="0.84B")
    ap.add_argument("--models", type=int, default=4, help="checkpoints in all, base included")
    ap.add_argument("--methods", default="task_arithmetic,linear,ties,ties_model")
    ap.add_argument("--tools", default="floor,weightsmith,mergekit")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--work", type=Path, default=ROOT / ".bench")
    ap.add_argument("--mergekit", default=str(ROOT / ".bench/mergekit-venv/bin/mergekit-yaml"))
    ap.add_argument("--ws-args", default="", help="extra arguments for weightsmith merge")
    ap.add_argument("--extract-rank", type=int, default=64, help="extract_lora: --rank of the adapter")
    ap.add_argument("--extract-args", default="", help="extra arguments for weightsmith extract-lora")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    args = ap.parse_args()

    params = parse_size(args.params.replace("B", "G"))
    folders = build(args.work / f"ckpt-{args.params}-{args.models}", params, args.models)
    input_bytes = sum(f.stat().st_size for d in folders for f in d.glob("*.safetensors"))
    out_bytes = sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))
    tools = args.tools.split(",")
    if "mergekit" in tools and not Path(args.mergekit).exists():
        print(f"mergekit not found at {args.mergekit}; skipping it", file=sys.stderr)
        tools.remove("mergekit")
    ws = [sys.executable, "-m", "weightsmith.cli", "merge"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    runs = []
    for method in args.methods.split(","):
        path = args.work / f"bench-{method}.yaml"
        if method != EXTRACT:
            path.write_text(yaml.safe_dump(recipe(method, folders), sort_keys=False))
        for rep in range(args.repeat):
            for tool in tools:
                if tool == "mergekit" and (method == "ties_model" or method in SPECTRAL):
                    continue  # mergekit has only per-tensor TIES, and no spectral merges
                if method == EXTRACT and tool != "weightsmith":
                    continue  # weightsmith's own command: no floor or mergekit row
                out = args.work / f"out-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                if method == EXTRACT:
                    cmd = extract_command(folders, out, args.extract_rank, args.extract_args)
                elif tool == "floor":
                    cmd = [sys.executable, str(HERE / "floor.py"), str(out) + ".bin", str(out_bytes)]
                    cmd += [str(f) for f in (folders if method != "linear" else folders)]
                elif tool == "weightsmith":
                    cmd = ws + [str(path), str(out), "-q", *args.ws_args.split()]
                else:
                    cmd = [args.mergekit, str(path), str(out)]
                warm(folders)
                # Flush the dirty pages earlier runs left (mergekit does not fsync its output):
                # otherwise this run's writes are throttled by their writeback, and the floor
                # alone was seen to vary from 1.7 s to 5.3 s for the same bytes.
                os.sync()
                load_before = os.getloadavg()[0]
                try:
                    figures = timed(cmd, env)
                except RuntimeError as exc:
                    # One tool failing one method must not lose the other rows of a long run.
                    failed = {"method": method, "tool": tool, "repeat": rep, "error": str(exc)[-500:]}
                    runs.append(failed)
                    print(json.dumps(failed), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                    continue
                figures.update(method=method, tool=tool, repeat=rep, load_avg_1m=round(load_before, 2))
                moved = extract_bytes(folders) if method == EXTRACT else input_bytes + out_bytes
                figures["bytes_per_s"] = round(moved / figures["wall_s"])
                runs.append(figures)
                print(json.dumps(figures), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "params": args.params,
        "models": args.models,
        "input_bytes": input_bytes,
        "output_bytes": out_bytes,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def extract_command(folders: list[Path], out: Path, rank: int, extra: str) -> list[str]:
    """``weightsmith extract-lora ft0 base OUT --rank R``: the first fine-tune against the base."""
    base, ft = folders[0], folders[1]
    return [sys.executable, "-m", "weightsmith.cli", "extract-lora", str(ft), str(base), str(out),
            "--rank", str(rank), "-q", *extra.split()]


def extract_bytes(folders: list[Path]) -> int:
    """What extract-lora reads: the fine-tune and the base (its adapter is tiny beside them)."""
    return sum(f.stat().st_size for d in folders[:2] for f in d.glob("*.safetensors"))


def table(result: dict) -> str:
    """Best-of-repeats per (method, tool), with ratios to mergekit and to the floor."""
    best: dict[tuple[str, str], dict] = {}
    for r in result["runs"]:
        if "error" in r:
            continue
        key = (r["method"], r["tool"])
        if key not in best or r["wall_s"] < best[key]["wall_s"]:
            best[key] = r
    floor = {m: r["wall_s"] for (m, t), r in best.items() if t == "floor"}
    lines = [
        f"{result['models']} checkpoints of {result['params']} params "
        f"({format_size(result['input_bytes'])} read, {format_size(result['output_bytes'])} written)",
        "",
        "| method | tool | wall s | CPU s | peak RSS | GB/s "
        "| vs mergekit (wall) | vs mergekit (CPU) | vs floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, tool), r in sorted(best.items()):
        mk = best.get((method, "mergekit"))
        versus = mk and tool not in ("mergekit", "floor")
        speedup = f"{mk['wall_s'] / r['wall_s']:.1f}x faster" if versus else ""
        # CPU seconds: the fairer ratio on a machine that other work shares (wall times inflate).
        cpu_ratio = f"{mk['cpu_s'] / r['cpu_s']:.1f}x less" if versus else ""
        fl = floor.get(method) or next(iter(floor.values()), None)
        vs_floor = f"{r['wall_s'] / fl:.1f}x" if fl and tool != "floor" else ""
        lines.append(
            f"| {method} | {tool} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{format_size(r['peak_rss_bytes'])} | {r['bytes_per_s'] / 1e9:.2f} | "
            f"{speedup} | {cpu_ratio} | {vs_floor} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
