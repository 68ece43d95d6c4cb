"""Fine-tuning transfer reproduction (algorithms.md §11 item 8) on the TinyLM testbed.

    python benchmarks/quality/transfer.py [--testbeds DIR] [--seeds 0 1 2]

The testbed has two versions of one model: v1 = ``base`` and v2 = ``base-v2`` (v1 continued on
more pre-training data, half of it longer strings: linearly connected to v1). Per task and seed:
fine-tune v1 -> ft1, Delta = ft1 - v1, transfer v2 + Delta (``merge_method: transfer``), and
fine-tune v2 directly -> ft2 (the target the transfer should approach). Recycling-then-
finetuning: fine-tune v2 for N steps from v2 itself and from v2 + Delta (``init_from``, what
``weightsmith transfer --then-finetune`` does), N in {10, 25, 50}. Metric: test exact match.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from reporting import environment, fmt, holds, log, table, write
from tinylm_runs import Scorers, finetuned, merged, start, state

from weightsmith.finetune import finetune
from weightsmith.testbeds.tinylm import FINETUNE, MAX_LENGTH

TASKS = ("revsep", "mod7")
BUDGETS = (10, 25, 50)
CEILING = 0.995  # exact match at or above this in every seed: a saturated comparison


def run(bed: Path, work: Path, task: str, seed: int, scorers: Scorers) -> dict[str, Any]:
    ft1 = finetuned(bed, work, task, seed)
    ft2 = finetuned(bed, work, task, seed, base="base-v2")
    folder = work / "transfer" / f"{task}-s{seed}"
    transferred = folder / "transferred"
    recipe = {"merge_method": "transfer", "base_model": str(bed / "base-v2"),
              "models": [{"model": str(ft1), "parameters": {"source_base": str(bed / "base")}}],
              "vocab_policy": "pad"}
    weights = merged(recipe, transferred)
    split = f"{task}/test"
    out: dict[str, Any] = {
        "v1": scorers.score(state(bed / "base"), split),
        "ft1": scorers.score(state(ft1), split),
        "v2": scorers.score(state(bed / "base-v2"), split),
        "v2+delta": scorers.score(weights, split),
        "ft2": scorers.score(state(ft2), split),
    }
    for n in BUDGETS:
        opts = {**FINETUNE, "steps": n, "warmup_steps": max(1, n // 10), "seed": seed,
                "max_length": MAX_LENGTH, "quiet": True, "overwrite": True}
        data = bed / "data" / task / "train.jsonl"
        plain = finetune(bed / "base-v2", folder / f"v2-{n}", data, "causal-lm", **opts)
        recycled = finetune(bed / "base-v2", folder / f"recycled-{n}", data, "causal-lm",
                            init_from=str(transferred), **opts)
        out[f"from v2, {n}"] = scorers.score(state(plain.out_dir), split)
        out[f"from v2+delta, {n}"] = scorers.score(state(recycled.out_dir), split)
    log(f"{task} seed {seed}: {out}")
    return out


def main() -> None:
    args, bed, scorers, started = start(__doc__)
    results = {t: [run(bed, args.work, t, s, scorers) for s in args.seeds] for t in TASKS}
    write("transfer", report(results, args.seeds, time.perf_counter() - started, args.threads), args.out)


def report(results: dict[str, list[dict[str, Any]]], seeds: list[int], seconds: float, threads: int) -> str:
    keys = ["v1", "ft1", "v2", "v2+delta", "ft2"]
    labels = {"v1": "v1 (base)", "ft1": "ft1 = v1 fine-tuned", "v2": "v2 (base-v2)",
              "v2+delta": "**v2 + (ft1 − v1)** (transfer)", "ft2": "ft2 = v2 fine-tuned (200 steps)"}
    main_rows = [[labels[k], *[fmt([r[k] for r in results[t]], percent=True) for t in TASKS]] for k in keys]
    main_table = table(["model", *[f"{t} test exact match %" for t in TASKS]], main_rows)
    rec_rows = []
    for n in BUDGETS:
        row = [str(n)]
        for t in TASKS:
            row += [fmt([r[f"from v2, {n}"] for r in results[t]], percent=True),
                    fmt([r[f"from v2+delta, {n}"] for r in results[t]], percent=True)]
        rec_rows.append(row)
    header = ["steps"]
    for t in TASKS:
        header += [f"{t}: from v2", f"{t}: from v2 + Delta"]
    rec_table = table(header, rec_rows)
    lines = []
    for t in TASKS:
        rs = results[t]
        ok, why = holds([r["v2+delta"] for r in rs], [r["v2"] for r in rs])
        gap = [(r["v2+delta"] - r["v2"]) / (r["ft2"] - r["v2"]) if r["ft2"] > r["v2"] else float("nan")
               for r in rs]
        lines.append(f"- `{t}`, v2 + Delta vs v2: {'**reproduced**' if ok else '**did not reproduce**'} "
                     f"({why}); the transfer closes {fmt(gap, percent=True)}% of the gap from v2 to ft2.")
        for n in BUDGETS:
            recycled, plain = [r[f"from v2+delta, {n}"] for r in rs], [r[f"from v2, {n}"] for r in rs]
            if min(recycled + plain) >= CEILING:
                lines.append(f"- `{t}`, after {n} steps: both starts are at the ceiling (>= "
                             f"{CEILING:.1%} in every seed): nothing left to compare.")
                continue
            ok, why = holds(recycled, plain)
            lines.append(f"- `{t}`, recycling after {n} steps beats fine-tuning v2 from scratch: "
                         f"{'**reproduced**' if ok else '**did not reproduce**'} ({why}).")
    findings = "\n".join(lines)
    return f"""# Fine-tuning transfer reproduction (TinyLM)

Generated by `python benchmarks/quality/transfer.py` (seeds {seeds}); algorithms.md §11 item 8.
{environment(seconds, threads)}

Two versions of one model: v1 = the TinyLM base; v2 = v1 continued for 300 steps on new
pre-training data (half of it longer strings), so v1 and v2 are linearly connected, like
consecutive releases. Each held-out skill is fine-tuned on v1 (ft1) and, for reference, on v2
(ft2), 200 steps each with the seed. Transfers ran through `weightsmith merge`
(`merge_method: transfer`, float64 arithmetic); the recycling runs start from the transferred
weights with the finetune engine's `init_from`, as `weightsmith transfer --then-finetune` does.
Test exact match, mean ± std over seeds.

{main_table}

Recycling-then-finetuning: v2 fine-tuned for N steps (same lr, warmup N/10), from v2 itself or
from v2 + Delta.

{rec_table}

Expected (paper): v2 + Delta >> v2 on the fine-tuned task, recovering much of the gap to ft2;
starting fine-tuning from v2 + Delta reaches ft2's accuracy in fewer steps than starting from v2.

{findings}

Not run: the paper's negative control (a v2' pre-trained independently from another seed, where
the transfer should fail): a second TinyLM pre-training costs ~2.5 min of the 10-minute budget.
"""


if __name__ == "__main__":
    main()
