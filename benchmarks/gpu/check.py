"""The prepared GPU check: verify the CUDA backend and measure it, in one run under 8 minutes on
a machine with one GPU and 16 cores (``benchmarks/gpu/check.sh`` installs what it can and
calls this).

    python benchmarks/gpu/check.py [--params 0.84B] [--models 4] [--budget-s 450]

Steps, each reported whatever happens to the others:

1. the environment: torch / CUDA / device, numba.cuda, CuPy, what is missing; then the CPU
   and CUDA kernels are compiled (or loaded from numba's cache) before anything is timed;
2. ``pytest -m gpu tests/test_gpu.py tests/test_gpu_svd.py`` (the CUDA kernels against the CPU
   fused kernels, bit for bit, and ``--device cuda`` merges against CPU bytes; the spectral
   merges' and extract-lora's SVDs on the GPU);
3. 4 synthetic bf16 checkpoints (``benchmarks/make_checkpoints.py``) merged with
   task_arithmetic, ties and ties ``scope: model`` on the CPU, with ``--device cuda`` (the
   device pipeline, torch path) and with ``--device cuda --kernels cupy`` (the numba.cuda
   kernels); every GPU output is compared with the CPU's, tensor by tensor:
   equal bytes, or the number of differing values and the largest difference in bf16 ulps;
4. the SVD-heavy work (``--spectral``: tsv, iso_c, iso_cts, extract_lora): one
   ``--matrix-size`` square matrix per method through ``benchmarks/spectral.py`` on the CPU and
   with ``--device cuda``, then per model (the same checkpoints; ``--spectral-memory-budget``
   for the vocabulary matrices' SVDs) on the CPU and ``--device cuda``. cuSOLVER's SVDs are not
   LAPACK's, so these outputs are compared within a tolerance: tsv / iso values at most
   ``SPECTRAL_ULP`` bf16 ulps apart, extract-lora's worst relative error within
   ``EXTRACT_REL_TOL`` of the CPU's;
5. a table: wall time, GB/s of input read, device memory peak (torch's allocator, read inside
   the merge process), speed-up over the CPU path, output check.

Without a GPU, ``--paths cpu --skip-tests`` runs every CPU step (a dry run of the rest).

Steps still to run when the time budget is spent are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

METHODS = ("task_arithmetic", "ties", "ties_model")
SPECTRAL = ("tsv", "iso_c", "iso_cts", "extract_lora")  # SVD per matrix: CPU and cuda-torch only
SPECTRAL_PATHS = ("cpu", "cuda-torch")
SPECTRAL_ULP = 4  # bf16 ulps a GPU tsv / iso output may differ from the CPU's (other SVD library)
EXTRACT_REL_TOL = 0.01  # relative difference allowed between the CPU and GPU worst errors
PATHS = {  # label -> extra ``weightsmith merge`` arguments
    "cpu": [],
    "cuda-torch": ["--device", "cuda"],
    "cuda-cupy": ["--device", "cuda", "--kernels", "cupy"],
}
# Run inside each merge process: the CLI, then torch's device memory peak into a JSON file.
PROBE = """
import json, sys, time
report, args = sys.argv[1], sys.argv[2:]
from weightsmith.cli import main
code = 0
try:
    main(args, standalone_mode=False)
except SystemExit as e:
    code = e.code or 0
except Exception as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    code = 1
peak = reserved = None
try:
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
except Exception:
    pass
json.dump({"device_peak_bytes": peak, "device_reserved_bytes": reserved}, open(report, "w"))
sys.exit(code)
"""

# Compile (or load from numba's on-disk cache) the CPU and CUDA kernels once before any timing,
# so no timed merge pays for compilation.
WARM = """
import time
t = time.perf_counter()
from weightsmith.ops import cuda_fused, fused
fused.warm_up()
cuda_fused.warm_up()
print(f"{time.perf_counter() - t:.1f} s")
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="0.84B", help="parameters per checkpoint")
    ap.add_argument("--models", type=int, default=4, help="checkpoints in all, the base included")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--paths", default=",".join(PATHS), help=f"merge paths to run, of {', '.join(PATHS)}")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench", help="checkpoints and outputs")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip steps that would start after this")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the gpu tests")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    ap.add_argument("--spectral", default=",".join(SPECTRAL), help="SVD-heavy methods timed ('' for none)")
    ap.add_argument("--matrix-size", type=int, default=4096, help="side of the per-matrix spectral timing")
    ap.add_argument("--spectral-memory-budget", default="16GB",
                    help="--memory-budget of the per-model spectral runs (vocabulary matrices' SVDs)")
    ap.add_argument("--extract-rank", type=int, default=64, help="extract_lora: the adapter's rank")
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.spectral = [m for m in args.spectral.split(",") if m]
    for m in args.spectral:
        if m not in SPECTRAL:
            ap.error(f"--spectral: {m!r} is not one of {', '.join(SPECTRAL)}")
    args.paths = [p for p in args.paths.split(",") if p]
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
    for p in args.paths:
        if p not in PATHS:
            ap.error(f"--paths: {p!r} is not one of {', '.join(PATHS)}")
    if "cpu" not in args.paths:
        args.paths.insert(0, "cpu")  # the reference every other path is compared with
    return args


# --------------------------------------------------------------------------- environment
def environment() -> dict[str, Any]:
    """What the check can use, and what is missing (one line each)."""
    env: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "missing": []}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if env["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            env["device"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        else:
            env["missing"].append("a CUDA device visible to torch (torch.cuda.is_available() is False)")
    except Exception as e:  # torch is a dependency: this is a broken install
        env["missing"].append(f"torch ({e})")
    try:
        import numba

        env["numba"] = numba.__version__
        from weightsmith.ops import cuda_fused

        env["nvvm"] = nvvm_version()
        if env["nvvm"] is None:
            env["missing"].append("libNVVM (set CUDA_HOME to a CUDA toolkit): CUDA kernels cannot compile")
        env["numba_cuda"] = cuda_fused.available() and not cuda_fused.simulated()
        if not env["numba_cuda"]:
            env["missing"].append("numba.cuda with a driver (the CUDA kernels cannot launch)")
    except Exception as e:
        env["missing"].append(f"numba ({e})")
    try:
        import cupy

        env["cupy"] = cupy.__version__
    except Exception:
        env["missing"].append("cupy (pip install cupy-cuda12x; only the CuPy interop test needs it)")
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=name,driver_version,memory.total"
        done = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True)
        env["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    return env


def nvvm_version() -> str | None:
    """The libNVVM numba compiles CUDA kernels with, or None where it cannot load one."""
    try:
        from numba.cuda.cudadrv.nvvm import NVVM

        return ".".join(map(str, NVVM().get_version()))
    except Exception:
        return None


# --------------------------------------------------------------------------- tests
def run_gpu_tests(timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "tests/test_gpu_svd.py",
           "-p", "no:cacheprovider"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "summary": f"timed out after {timeout_s:.0f} s", "tail": ""}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"ok": done.returncode == 0, "summary": lines[-1] if lines else "", "tail": done.stdout[-3000:]}


# --------------------------------------------------------------------------- merges
@dataclass
class Run:
    method: str
    path: str
    wall_s: float | None = None
    device_peak_bytes: int | None = None
    error: str | None = None
    check: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def timed_merge(recipe: Path, out: Path, extra: list[str]) -> tuple[float, dict[str, Any], str, int]:
    return timed_cli(["merge", str(recipe), str(out), "-q", *extra], out)


def timed_cli(cli_args: list[str], out: Path) -> tuple[float, dict[str, Any], str, int]:
    """One weightsmith command in a fresh process (PROBE): wall time, device peak, stderr, code."""
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        cmd = [sys.executable, "-c", PROBE, report.name, *cli_args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        text = Path(report.name).read_text()
        probe = json.loads(text) if text else {}
    return wall, probe, done.stderr, done.returncode


def compare_outputs(ref: Path, got: Path) -> str:
    """"equal bytes", or how many values differ and by how many bf16 ulps at most."""
    found = output_difference(ref, got)
    if isinstance(found, str):
        return found
    differing, worst = found
    if differing == 0:
        return "equal bytes"
    return f"{differing} values differ, at most {worst} ulp"


def output_difference(ref: Path, got: Path) -> tuple[int, int] | str:
    """(values that differ, the largest distance in ulps), or why the folders do not compare."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(ref), tensors(got)
    if a.keys() != b.keys():
        return f"DIFFERENT tensor names ({len(a.keys() ^ b.keys())} not in both)"
    differing = 0
    worst = 0
    for name, x in a.items():
        y = b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"DIFFERENT dtype/shape for {name}"
        bx, by = x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
        if torch.equal(bx, by):
            continue
        differing += int((x != y).sum())
        worst = max(worst, ulp_distance(x, y))
    return differing, worst


def ulp_distance(x: Any, y: Any) -> int:
    """Largest distance in units in the last place between two same-dtype float tensors (bf16,
    fp16, fp32), through their order-preserving integer keys."""
    import torch

    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    ints = []
    for t in (x, y):
        i = t.reshape(-1).view(int_type).to(torch.int64)
        sign = 1 << (8 * x.element_size() - 1)
        # negative floats: flip so that the integer order follows the float order
        ints.append(torch.where(i < 0, -(i + sign), i))
    return int((ints[0] - ints[1]).abs().max()) if x.numel() else 0


def run_merges(args: argparse.Namespace, deadline: float, log: Any) -> tuple[list[Run], dict[str, Any]]:
    import yaml
    from make_checkpoints import build
    from run import recipe

    from weightsmith.units import parse_size

    start = time.perf_counter()
    params = parse_size(args.params.replace("B", "G"))
    folders = build(args.work / f"ckpt-{args.params}-{args.models}", params, args.models)
    input_bytes = sum(f.stat().st_size for d in folders for f in d.glob("*.safetensors"))
    meta = {"input_bytes": input_bytes, "build_s": round(time.perf_counter() - start, 1)}
    log(f"checkpoints ready in {meta['build_s']} s ({input_bytes / 1e9:.2f} GB)")
    runs: list[Run] = []
    for method in args.methods:
        path = args.work / f"gpu-check-{method}.yaml"
        path.write_text(yaml.safe_dump(recipe(method, folders), sort_keys=False))
        for label in args.paths:
            run = Run(method, label)
            runs.append(run)
            if time.perf_counter() > deadline:
                run.error = "skipped: time budget spent"
                continue
            if not finished(run, *timed_merge(path, args.work / f"gpu-check-out-{label}", PATHS[label]), log):
                continue
            if label != "cpu":
                outs = args.work / "gpu-check-out-cpu", args.work / f"gpu-check-out-{label}"
                run.check = compare_outputs(*outs)
            log(f"{method} {label}: {run.wall_s} s {run.check}")
        for label in args.paths:
            shutil.rmtree(args.work / f"gpu-check-out-{label}", ignore_errors=True)
    return runs, meta


def finished(run: Run, wall: float, probe: dict[str, Any], stderr: str, code: int, log: Any) -> bool:
    """Record one timed run's outcome on ``run``; False (with the error logged) if it failed."""
    if code != 0:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        run.error = f"failed (exit {code}): {last}"
        log(f"{run.method} {run.path}: {run.error}")
        return False
    run.wall_s = round(wall, 2)
    run.device_peak_bytes = probe.get("device_peak_bytes")
    return True


# --------------------------------------------------------------------------- spectral
def time_matrices(args: argparse.Namespace, deadline: float, log: Any) -> list[dict[str, Any]]:
    """benchmarks/spectral.py per device: one ``--matrix-size`` matrix per spectral method."""
    devices = ["cpu"] + (["cuda"] if "cuda-torch" in args.paths else [])
    rows: list[dict[str, Any]] = []
    for device in devices:
        if not args.spectral:
            break
        if time.perf_counter() > deadline:
            rows.append({"device": device, "error": "skipped: time budget spent"})
            continue
        cmd = [sys.executable, str(ROOT / "benchmarks" / "spectral.py"), "--size", str(args.matrix_size),
               "--tasks", "2", "--methods", ",".join(args.spectral), "--device", device,
               "--rank", str(args.extract_rank)]
        done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True)
        found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or [""]
            found.append({"device": device, "error": f"failed (exit {done.returncode}): {tail[0]}"})
        rows += found
        for row in found:
            log(f"matrix {args.matrix_size}^2 {row.get('method', '')} {device}: "
                f"{row.get('wall_s', row.get('error'))} s wall, {row.get('cpu_s', '')} s CPU")
    return rows


def spectral_command(method: str, folders: list[Path], recipe: Path, out: Path, label: str,
                     args: argparse.Namespace) -> list[str]:
    """The weightsmith command line of one per-model spectral run."""
    budget = ["--memory-budget", args.spectral_memory_budget]
    device = PATHS[label]
    if method == "extract_lora":
        base, ft = folders[0], folders[1]
        return ["extract-lora", str(ft), str(base), str(out), "--rank", str(args.extract_rank), "-q",
                *budget, *device]
    return ["merge", str(recipe), str(out), "-q", *budget, *device]


def worst_error(out: Path) -> float:
    report = json.loads((out / "extract_report.json").read_text())
    return max((m["relative_error"] for m in report["modules"] if m["rank"]), default=0.0)


def spectral_check(method: str, ref: Path, got: Path) -> tuple[str, bool]:
    """How a GPU spectral output compares with the CPU's, and whether that is within tolerance."""
    if method == "extract_lora":
        a, b = worst_error(ref), worst_error(got)
        close = abs(a - b) <= EXTRACT_REL_TOL * max(a, b, 1e-12)
        return f"worst relative error {b:.4f} (CPU {a:.4f})", close
    found = output_difference(ref, got)
    if isinstance(found, str):
        return found, False
    differing, worst = found
    if differing == 0:
        return "equal bytes", True
    return f"{differing} values differ, at most {worst} ulp (tolerance {SPECTRAL_ULP})", worst <= SPECTRAL_ULP


def run_spectral(args: argparse.Namespace, deadline: float, log: Any) -> list[Run]:
    """Per model: tsv / iso merges and extract-lora of ft0 vs base, on the CPU and the GPU."""
    import yaml
    from make_checkpoints import build
    from run import recipe

    from weightsmith.units import parse_size

    params = parse_size(args.params.replace("B", "G"))
    folders = build(args.work / f"ckpt-{args.params}-{args.models}", params, args.models)
    runs: list[Run] = []
    labels = [p for p in args.paths if p in SPECTRAL_PATHS]
    for method in args.spectral:
        path = args.work / f"gpu-check-{method}.yaml"
        if method != "extract_lora":
            path.write_text(yaml.safe_dump(recipe(method, folders), sort_keys=False))
        read = folders[:2] if method == "extract_lora" else folders
        input_bytes = sum(f.stat().st_size for d in read for f in d.glob("*.safetensors"))
        for label in labels:
            run = Run(method, label, extra={"input_bytes": input_bytes, "spectral": True})
            runs.append(run)
            if time.perf_counter() > deadline:
                run.error = "skipped: time budget spent"
                continue
            out = args.work / f"gpu-check-out-{label}"
            command = spectral_command(method, folders, path, out, label, args)
            if not finished(run, *timed_cli(command, out), log):
                continue
            if label != "cpu":
                run.check, run.extra["within"] = spectral_check(method, args.work / "gpu-check-out-cpu", out)
            log(f"{method} {label}: {run.wall_s} s {run.check}")
        for label in labels:
            shutil.rmtree(args.work / f"gpu-check-out-{label}", ignore_errors=True)
    return runs


def matrix_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | device | matrix | wall s | CPU s |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('method', '')} | {r['device']} | | | {r['error']} |")
        else:
            size = f"{r['size']} x {r['size']}"
            lines.append(f"| {r['method']} | {r['device']} | {size} | {r['wall_s']} | {r['cpu_s']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report
def gib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f} GiB"


def table(runs: list[Run], input_bytes: int) -> str:
    """Markdown table: one row per (method, path), speed-up over the CPU run of the method."""
    cpu = {r.method: r.wall_s for r in runs if r.path == "cpu" and r.wall_s}
    lines = [
        "| method | path | wall s | GB/s read | device peak | vs CPU | output check |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if r.wall_s is None:
            lines.append(f"| {r.method} | {r.path} | | | | | {r.error} |")
            continue
        rate = f"{r.extra.get('input_bytes', input_bytes) / r.wall_s / 1e9:.2f}"
        base = cpu.get(r.method)
        speed = f"{base / r.wall_s:.2f}x" if base and r.path != "cpu" else ""
        check = "reference" if r.path == "cpu" else r.check
        peak = gib(r.device_peak_bytes)
        lines.append(f"| {r.method} | {r.path} | {r.wall_s:.1f} | {rate} | {peak} | {speed} | {check} |")
    return "\n".join(lines)


def verdict(tests: dict[str, Any] | None, runs: list[Run]) -> str:
    """PASS when the gpu tests passed and every GPU output that ran equals the CPU's bytes."""
    problems = []
    if tests is not None and not tests["ok"]:
        problems.append(f"gpu tests: {tests['summary']}")
    for r in runs:
        if r.error and not r.error.startswith("skipped"):
            problems.append(f"{r.method} {r.path}: {r.error}")
        elif r.wall_s is not None and r.path != "cpu" and "within" in r.extra:
            if not r.extra["within"]:  # spectral: another SVD library, compared within a tolerance
                problems.append(f"{r.method} {r.path}: {r.check}")
        elif r.wall_s is not None and r.path != "cpu" and r.check != "equal bytes":
            problems.append(f"{r.method} {r.path}: {r.check}")
    return "PASS" if not problems else "FAIL: " + "; ".join(problems)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget_s

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", flush=True)

    env = environment()
    log("environment: " + json.dumps(env))
    for item in env["missing"]:
        log(f"MISSING: {item}")
    warm = subprocess.run([sys.executable, "-c", WARM], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True)
    log(f"kernels compiled or loaded from numba's cache: {warm.stdout.strip() or warm.stderr.strip()[-300:]}")
    tests = None
    if not args.skip_tests:
        tests = run_gpu_tests(timeout_s=max(30.0, min(240.0, deadline - time.perf_counter() - 180)))
        log(f"gpu tests: {'ok' if tests['ok'] else 'FAILED'}: {tests['summary']}")
        if not tests["ok"]:
            print(tests["tail"])
    runs, meta = run_merges(args, deadline, log)
    matrices = time_matrices(args, deadline, log)
    if args.spectral:
        runs += run_spectral(args, deadline, log)
    result = {
        "environment": env,
        "tests": tests,
        "params": args.params,
        "models": args.models,
        **meta,
        "runs": [r.__dict__ for r in runs],
        "matrices": matrices,
        "total_s": round(time.perf_counter() - started, 1),
    }
    result["verdict"] = verdict(tests, runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    read = meta["input_bytes"] / 1e9
    print(f"{args.models} checkpoints of {args.params} params, {read:.2f} GB read per merge")
    print(table(runs, meta["input_bytes"]))
    if matrices:
        print(f"\nspectral methods, one matrix (benchmarks/spectral.py, 2 task vectors; extract_lora rank "
              f"{args.extract_rank})")
        print(matrix_table(matrices))
    print(f"\nverdict: {result['verdict']}  (total {result['total_s']} s; JSON in {args.out})")
    return 0 if result["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
