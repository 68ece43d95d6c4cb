"""Skill-grafting reproduction (algorithms.md §11 item 9) on the TinyLM testbed.

    python benchmarks/quality/graft.py [--testbeds DIR] [--seeds 0 1 2]

Per seed: fine-tune the base on ``revsep`` (a held-out skill: the base scores 0), then for each
starting sparsity s search a graft mask with ``optimize_graft`` (what ``weightsmith graft``
runs: global top-s start, sigmoid parametrisation with bias 10, best rounded mask on
train + validation exact match; lr auto, 25 steps) on 256 training and 100 validation examples.
The optimised mask is compared, at the SAME number of grafted parameters, with the top-|delta|
mask and a uniformly random mask; every grafted model is written by ``merge_method: graft``.
Metric: recovered fraction = (acc_graft - acc_base) / (acc_ft - acc_base) on the test split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from reporting import environment, fmt, holds, log, table, write
from tinylm_runs import Scorers, finetuned, merged, start, state

from weightsmith.finetune.grafting import optimize_graft
from weightsmith.ops.graft import random_mask, top_fraction_mask
from weightsmith.testbeds.tinylm import MAX_LENGTH

TASK = "revsep"
SPARSITIES = (0.001, 0.01, 0.05)
STEPS = 25
TRAIN_EXAMPLES, VAL_EXAMPLES = 256, 100


def subset(src: Path, dst: Path, n: int) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dst


def graft_merge(bed: Path, ft: Path, mask: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mask.safetensors"
    save_file({k: v.contiguous() for k, v in mask.items()}, str(path))
    recipe = {"merge_method": "graft", "base_model": str(bed / "base"), "models": [{"model": str(ft)}],
              "parameters": {"mask": str(path)}}
    return merged(recipe, folder / "model")


def run(bed: Path, work: Path, seed: int, scorers: Scorers) -> dict[str, Any]:
    ft = finetuned(bed, work, TASK, seed)
    folder = work / "graft" / f"s{seed}"
    data = bed / "data" / TASK
    train = subset(data / "train.jsonl", folder / "train.jsonl", TRAIN_EXAMPLES)
    val = subset(data / "val.jsonl", folder / "val.jsonl", VAL_EXAMPLES)
    split = f"{TASK}/test"
    acc_base = scorers.score(None, split)
    acc_ft = scorers.score(state(ft), split)
    pre, fine = state(bed / "base"), state(ft)
    deltas = {k: fine[k].float() - pre[k].float() for k in pre if pre[k].dtype.is_floating_point}
    shapes = {k: d.shape for k, d in deltas.items()}
    total = sum(d.numel() for d in deltas.values())
    out: dict[str, Any] = {"base": acc_base, "ft": acc_ft, "params": total}

    def recovered(acc: float) -> float:
        return (acc - acc_base) / (acc_ft - acc_base)

    for s in SPARSITIES:
        result = optimize_graft(bed / "base", ft, train, "causal-lm", s, val=val, steps=STEPS, lr="auto",
                                max_length=MAX_LENGTH, batch_size=64, seed=seed)
        count = result.grafted
        opt = graft_merge(bed, ft, result.mask, folder / f"opt-{s}")
        start = graft_merge(bed, ft, top_fraction_mask(deltas, s), folder / f"start-{s}")
        magnitude = graft_merge(bed, ft, top_fraction_mask(deltas, count / total), folder / f"mag-{s}")
        rand = graft_merge(bed, ft, random_mask(shapes, count, torch.Generator().manual_seed(seed)),
                           folder / f"rand-{s}")
        out[s] = {
            "fraction": count / total,
            "best_step": result.best_step,
            "optimised": recovered(scorers.score(opt, split)),
            "start": recovered(scorers.score(start, split)),
            "magnitude": recovered(scorers.score(magnitude, split)),
            "random": recovered(scorers.score(rand, split)),
            "history": [h["grafted"] / total for h in result.history],
        }
        log(f"seed {seed}, s {s}: {json.dumps({k: v for k, v in out[s].items() if k != 'history'})}")
    return out


def main() -> None:
    args, bed, scorers, started = start(__doc__)
    results = [run(bed, args.work, s, scorers) for s in args.seeds]
    write("graft", report(results, args.seeds, time.perf_counter() - started, args.threads), args.out)


def report(results: list[dict[str, Any]], seeds: list[int], seconds: float, threads: int) -> str:
    rows, lines = [], []
    for s in SPARSITIES:
        rs = [r[s] for r in results]
        rows.append([
            f"{s:g}", fmt([r["fraction"] for r in rs], digits=4),
            fmt([r["optimised"] for r in rs], percent=True),
            fmt([r["magnitude"] for r in rs], percent=True),
            fmt([r["random"] for r in rs], percent=True),
            fmt([r["start"] for r in rs], percent=True),
            ", ".join(str(r["best_step"]) for r in rs),
        ])
        opt = [r["optimised"] for r in rs]
        ok_mag, why_mag = holds(opt, [r["magnitude"] for r in rs])
        ok_rand, why_rand = holds(opt, [r["random"] for r in rs])
        ninety = sum(o >= 0.9 for o in opt)
        lines.append(
            f"- start s = {s:g} (final graft {fmt([r['fraction'] for r in rs], digits=4)} of the "
            f"parameters): optimised recovers >= 90% in {ninety}/{len(opt)} seeds "
            f"({'**reproduced**' if ninety >= 2 else '**did not reproduce**'}); beats top-magnitude "
            f"of equal size: {'**reproduced**' if ok_mag else '**did not reproduce**'} ({why_mag}); "
            f"beats random of equal size: {'**reproduced**' if ok_rand else '**did not reproduce**'} "
            f"({why_rand})."
        )
    main_table = table(
        ["start s", "final grafted fraction", "optimised graft %", "top-magnitude, same size %",
         "random, same size %", "top-magnitude at s (the start) %", "best step per seed"],
        rows,
    )
    base = fmt([r["base"] for r in results], percent=True)
    ft = fmt([r["ft"] for r in results], percent=True)
    findings = "\n".join(lines)
    return f"""# Skill-grafting reproduction (TinyLM)

Generated by `python benchmarks/quality/graft.py` (seeds {seeds}); algorithms.md §11 item 9.
{environment(seconds, threads)}

TinyLM ({results[0]['params']:,} floating parameters) fine-tuned on the held-out skill `{TASK}`
(one fine-tune per seed): test exact match {base} % for the base, {ft} % for the fine-tune.
Mask search: `optimize_graft` (the code behind `weightsmith graft`) on {TRAIN_EXAMPLES} training
and {VAL_EXAMPLES} validation examples, {STEPS} steps, lr auto, sigmoid bias 10, best rounded
mask by train + validation exact match (the start counts as step 0). Every grafted model was
written by `merge_method: graft`. Numbers: recovered fraction of the fine-tune's gain on the
test split, (acc − acc_base) / (acc_ft − acc_base), mean ± std over seeds. The baselines graft
exactly as many parameters as the optimised mask ended with.

{main_table}

Expected (paper): a small graft recovers >= 90% of the gain; optimised > top-magnitude >> random
at equal size.

{findings}

Notes: the search is free to grow or shrink the mask (the reference has no sparsity penalty; the
start sets the scale), so the final fraction is reported next to the starting s. Calibration
(ECE) is not reported: TinyLM's tasks are scored by exact match of generated strings.
"""


if __name__ == "__main__":
    main()
