"""A search's outputs: the best recipe as YAML, the trial table (CSV, JSON) and a plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml

from weightsmith.search.optimizer import SearchResult


def rows(result: SearchResult) -> list[dict[str, Any]]:
    best = float("-inf") if result.higher_is_better else float("inf")
    out = []
    for t in result.trials:
        if t.score == t.score:  # NaN never becomes the best so far
            best = max(best, t.score) if result.higher_is_better else min(best, t.score)
        out.append({"trial": t.trial, "score": t.score, "target": t.target, "control": t.control,
                    "best_so_far": best, **t.params})
    return out


def write_outputs(result: SearchResult, best_recipe: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    table = rows(result)
    written = [folder / "best_recipe.yaml", folder / "trials.json", folder / "trials.csv"]
    written[0].write_text(yaml.safe_dump(best_recipe, sort_keys=False))
    summary = {"best_trial": result.best, "best_score": result.best_trial.score,
               "best_params": result.best_trial.params, "higher_is_better": result.higher_is_better,
               "trials": table}
    written[1].write_text(json.dumps(summary, indent=2) + "\n")
    with written[2].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    plot = _plot(result, table, folder / "search.png")
    return [*written, *([plot] if plot else [])]


def _plot(result: SearchResult, table: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the [train] extra: the table says everything the plot shows
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["trial"] for r in table]
    left.plot(x, [r["score"] for r in table], "o", ms=4, label="trial")
    left.plot(x, [r["best_so_far"] for r in table], "-", label="best so far")
    left.set_xlabel("trial")
    left.set_ylabel("score")
    left.legend()
    params = result.best_trial.params
    right.barh(list(params), list(params.values()))
    right.set_title(f"best parameters (trial {result.best})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
