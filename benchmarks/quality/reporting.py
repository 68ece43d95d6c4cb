"""Shared helpers of the quality reproductions: testbeds, seeds, mean ± std, Markdown tables.

Every reproduction is one command, runs on the CPU testbeds with small settings over >= 3 seeds
and writes ``docs/reproductions/<name>.md``; the acceptance rule is algorithms.md §11's: the
expected direction must hold in >= 2 of 3 seeds and the mean difference must exceed one pooled
standard deviation.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "reproductions"
DEFAULT_TESTBEDS = ROOT / ".cache" / "testbeds"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--testbeds", type=Path, default=DEFAULT_TESTBEDS,
                   help="folder holding (or receiving) the testbed builds, one subfolder per testbed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "reproductions",
                   help="scratch folder for fine-tunes and merges")
    p.add_argument("--out", type=Path, default=None, help="Markdown file (default docs/reproductions/)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the testbeds use 1)")
    return p


def testbed(name: str, root: Path) -> Path:
    """The built testbed folder (a cache hit when it is already there)."""
    from weightsmith.testbeds import build

    folder = root / name
    info = build(name, folder, quiet=True)
    log(f"testbed {name} in {folder} ({'cached' if info.get('cached') else 'built'})")
    return folder


_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 3, percent: bool = False) -> str:
    m, s = mean_std(values)
    if percent:
        return f"{100 * m:.1f} ± {100 * s:.1f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def holds(better: Sequence[float], worse: Sequence[float], higher_is_better: bool = True) -> tuple[bool, str]:
    """algorithms.md §11's rule for "better beats worse" over paired seeds; and a short reason."""
    sign = 1 if higher_is_better else -1
    diffs = [sign * (b - w) for b, w in zip(better, worse, strict=True)]
    wins = sum(d > 0 for d in diffs)
    need = (2 * len(diffs) + 2) // 3  # 2 of 3
    pooled = 0.0
    if len(diffs) > 1:
        pooled = ((statistics.variance(better) + statistics.variance(worse)) / 2) ** 0.5
    mean_diff = statistics.fmean(diffs)
    ok = wins >= need and mean_diff > pooled
    return ok, f"{wins}/{len(diffs)} seeds, mean difference {mean_diff:+.3f} vs pooled std {pooled:.3f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def environment(seconds: float, threads: int) -> str:
    import transformers

    return (f"Run on {platform.machine()} CPU, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, {threads} torch thread(s), {seconds / 60:.1f} min wall time.")


def write(name: str, text: str, out: Path | None = None) -> Path:
    path = out or DOCS / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
    log(f"wrote {path}")
    return path
