"""Model soups reproduction (algorithms.md §11 item 3) on the MiniLM testbed.

    python benchmarks/quality/soups.py [--testbeds DIR] [--seeds 0 1 2]

Per seed: fine-tune the sentiment probe (``probe-sentiment``: MiniLM + linear-probe head) into
several ingredients with varied lr / label smoothing / seed, two of them deliberately bad (a
learning rate far too high), in a shuffled order. Then, all through ``weightsmith merge``:
uniform soup of every ingredient, uniform soup of the good ones only, and the greedy soup
(held-out = the testbed's validation split). Reported: validation loss (the selection metric),
test accuracy (ID) and test_ood accuracy (held-out templates and vocabulary).

The selection metric is validation *loss*: every sensible ingredient reaches 100% validation
accuracy on this testbed, and with accuracy ties a strictly-greater rule never adds anything.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch
from reporting import environment, fmt, holds, log, parser, table, testbed, write

from weightsmith.finetune import finetune
from weightsmith.finetune.evaluation import evaluate
from weightsmith.pipeline import merge

TASK = "sentiment"
STEPS = 30
COMMON = {"steps": STEPS, "batch_size": 16, "warmup_steps": 3, "max_length": 48,
          "freeze": ["classifier", "word_embeddings"], "quiet": True, "overwrite": True}
# (label, lr, label smoothing): three sensible recipes and two far too hot.
GOOD = [("lr3e-5", 3e-5, 0.0), ("lr5e-5-ls", 5e-5, 0.1), ("lr1e-4", 1e-4, 0.0)]
BAD = [("lr2e-3", 2e-3, 0.0), ("lr4e-3", 4e-3, 0.0)]


def scores(model: Path, data: Path) -> dict[str, float]:
    val = evaluate(model, data / "val.jsonl", "classification")
    return {
        "val_loss": val["loss"],
        "val_acc": val["accuracy"],
        "test": evaluate(model, data / "test.jsonl", "classification")["accuracy"],
        "ood": evaluate(model, data / "test_ood.jsonl", "classification")["accuracy"],
    }


def run_seed(seed: int, bed: Path, work: Path) -> dict[str, dict[str, float]]:
    data = bed / "data" / TASK
    folder = work / f"seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    recipes = [(*g, True) for g in GOOD] + [(*b, False) for b in BAD]
    random.Random(seed).shuffle(recipes)  # the recipe order must not matter to greedy
    ingredients: list[tuple[Path, bool]] = []
    for i, (label, lr, ls, good) in enumerate(recipes):
        out = folder / f"ing{i}-{label}"
        finetune(bed / f"probe-{TASK}", out, data / "train.jsonl", "classification",
                 lr=lr, label_smoothing=ls, seed=1000 * seed + i, **COMMON)
        ingredients.append((out, good))
        log(f"seed {seed}: ingredient {label} ({'good' if good else 'bad'}) trained")
    per: dict[str, dict[str, float]] = {}
    singles = {p: scores(p, data) for p, _ in ingredients}
    best = min(singles, key=lambda p: singles[p]["val_loss"])
    per["best single (by val loss)"] = singles[best]
    per["median ingredient"] = {k: sorted(s[k] for s in singles.values())[len(singles) // 2]
                                for k in singles[best]}
    soups = {
        "uniform soup, all": [p for p, _ in ingredients],
        "uniform soup, good only": [p for p, good in ingredients if good],
    }
    for name, members in soups.items():
        recipe = {"merge_method": "soup", "models": [str(m) for m in members]}
        out = merge(recipe, folder / name.replace(" ", "_").replace(",", ""), overwrite=True)
        per[name] = scores(out.out, data)
    started = time.perf_counter()
    greedy = merge({
        "merge_method": "soup",
        "models": [str(p) for p, _ in ingredients],
        "parameters": {"mode": "greedy"},
        "evaluation": {"data": str(data / "val.jsonl"), "task": "classification", "metric": "loss"},
    }, folder / "greedy", overwrite=True)
    summary = json.loads((greedy.out / "merge_report.json").read_text())["summary"]
    per["greedy soup"] = scores(greedy.out, data)
    per["greedy soup"]["kept"] = len(summary["chosen"])
    chosen = set(summary["chosen"])
    per["greedy soup"]["kept_bad"] = sum(1 for p, good in ingredients if not good and str(p) in chosen)
    log(f"seed {seed}: greedy kept {len(summary['chosen'])} of {len(ingredients)} in "
        f"{time.perf_counter() - started:.0f}s; " + ", ".join(
            f"{k}: test {v['test']:.3f} ood {v['ood']:.3f}" for k, v in per.items()))
    shutil.rmtree(folder, ignore_errors=True)  # ~90 MB per model: keep only the numbers
    return per


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bed = testbed("minilm", args.testbeds)
    runs = [run_seed(s, bed, args.work) for s in args.seeds]
    rows_order = ["median ingredient", "best single (by val loss)", "uniform soup, all",
                  "uniform soup, good only", "greedy soup"]

    def col(row: str, key: str) -> list[float]:
        return [r[row][key] for r in runs]

    rows = [[row, fmt(col(row, "val_loss")), fmt(col(row, "test"), percent=True),
             fmt(col(row, "ood"), percent=True)] for row in rows_order]
    best = "best single (by val loss)"
    never_worse = all(g <= b + 1e-6 for g, b in zip(col("greedy soup", "val_loss"), col(best, "val_loss")))
    expectations = [
        ("greedy ≥ best single on held-out data (val loss; ≤ by construction)",
         (never_worse, "every seed" if never_worse else "not in every seed")),
        ("greedy > best single, test accuracy", holds(col("greedy soup", "test"), col(best, "test"))),
        ("greedy > best single, OOD accuracy", holds(col("greedy soup", "ood"), col(best, "ood"))),
        ("greedy > uniform soup of all (bad ones in), test",
         holds(col("greedy soup", "test"), col("uniform soup, all", "test"))),
        ("greedy > uniform soup of all, OOD",
         holds(col("greedy soup", "ood"), col("uniform soup, all", "ood"))),
        ("bad ingredients hurt the uniform soup (good-only > all), test",
         holds(col("uniform soup, good only", "test"), col("uniform soup, all", "test"))),
    ]
    checks = [[label, "reproduced" if ok else "**not reproduced**", why] for label, (ok, why) in expectations]
    kept = [r["greedy soup"]["kept"] for r in runs]
    kept_bad = [r["greedy soup"]["kept_bad"] for r in runs]
    note = ""
    if max(kept) == 1:
        # Say plainly why greedy equals the best single ingredient when it never adds one.
        note = (
            "\n\nGreedy never added a second ingredient, so it equals the best single one: the best "
            "ingredient is far more confident than the others (validation loss "
            f"{fmt(col(best, 'val_loss'))} vs {fmt(col('uniform soup, good only', 'val_loss'))} for the "
            "good-only soup), and averaging in any other lowers its confidence on validation examples "
            "it already classifies correctly. The paper's gain of a soup over its best ingredient did "
            "not reproduce at this scale; rejecting the bad ingredients did."
        )
    seconds = time.perf_counter() - started
    text = f"""# Model soups (Wortsman et al. 2022) — small-scale reproduction

Generated by `python benchmarks/quality/soups.py` (do not edit by hand). {environment(seconds, args.threads)}

Setup: MiniLM testbed, task `{TASK}`. Per seed, {len(GOOD) + len(BAD)} ingredients fine-tuned from
`probe-{TASK}` for {STEPS} steps (head and word embeddings frozen, as the testbed's fine-tunes):
{", ".join(g[0] for g in GOOD)} (good) and {", ".join(b[0] for b in BAD)} (deliberately bad), shuffled.
Greedy soup: `merge_method: soup`, `mode: greedy`, held-out = the validation split, metric =
validation loss (accuracy is 100% for every good ingredient, so ties would never strictly improve).
Test = in-distribution test split; OOD = `test_ood` (held-out templates and vocabulary).
Seeds: {args.seeds} (ingredient seeds and recipe order). Mean ± std over seeds; accuracies in %.

{table(["model", "val loss", "test acc", "OOD acc"], rows)}

Greedy soup kept {fmt(kept, 1)} ingredients per seed (bad ones kept: {sum(kept_bad)} in total).{note}

## Expected effects

{table(["expectation", "result", "evidence"], checks)}

Rule (algorithms.md §11): the direction holds in ≥ 2 of 3 seeds and the mean difference exceeds one
pooled standard deviation. Absolute numbers are not expected to match the paper (CLIP ViT-B/32 on
ImageNet: greedy soup 81.03% vs best single 80.39%).
Not run here: the learned soup and the different-initialisation negative control.
"""
    write("soups", text, args.out)


if __name__ == "__main__":
    main()
