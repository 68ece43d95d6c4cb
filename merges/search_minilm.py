"""Search merges/minilm-search.yaml's weights and lambda on the MiniLM testbed (docs/search.md).

    bash merges/run-example.sh minilm-search        # builds the testbed once, then runs this
    python merges/search_minilm.py --testbed merges/inputs/minilm --workdir out/minilm-search

Each candidate is merged in memory and scored under every task's own probe head
(``weightsmith.search.heads.HeadsObjective``): mean validation loss over the four tasks, on the
first 32 rows of each ``val.jsonl`` (the search split). The best recipe and the recipe as
written are then scored on each task's whole ``test.jsonl`` (held out), and the best is merged
to disk normally. Same settings as tests/test_search_minilm.py, so the same figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
TASKS = ("sentiment", "topic", "question", "formality")
SEARCH_ROWS = 32


def load_example(testbed: Path) -> tuple[dict[str, Any], Any]:
    """The example recipe with its ``inputs/minilm/`` paths pointed at ``testbed``, and its space."""
    from weightsmith.search.space import Space

    text = (HERE / "minilm-search.yaml").read_text().replace("inputs/minilm/", f"{testbed}/")
    return yaml.safe_load(text), Space.load(HERE / "spaces" / "minilm-search.yaml")


def mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", type=Path, default=HERE / "inputs" / "minilm")
    ap.add_argument("--workdir", type=Path, default=Path("out/minilm-search"))
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from weightsmith.finetune.runtime import fixed_threads
    from weightsmith.pipeline import merge
    from weightsmith.search.heads import Head, HeadsObjective
    from weightsmith.search.optimizer import search
    from weightsmith.search.report import write_outputs

    started = time.perf_counter()
    bed = args.testbed.resolve()
    recipe, space = load_example(bed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    heads = []
    for t in TASKS:
        rows = (bed / "data" / t / "val.jsonl").read_text().splitlines(keepends=True)[:SEARCH_ROWS]
        (args.workdir / f"search-{t}.jsonl").write_text("".join(rows))
        heads.append(Head(t, bed / f"probe-{t}", args.workdir / f"search-{t}.jsonl"))
    held_heads = [Head(t, bed / f"probe-{t}", bed / "data" / t / "test.jsonl") for t in TASKS]
    options = {"metric": "loss", "max_length": 48, "batch_size": 64, "random_seed": args.seed}
    log = args.workdir / "trials.jsonl"
    log.unlink(missing_ok=True)  # a fresh search each run (the CLI's --resume is not offered here)
    with fixed_threads(1):
        objective = HeadsObjective(recipe, heads, **options)
        result = search(space, recipe, objective, trials=args.trials, log_path=log,
                        higher_is_better=False, seed=args.seed, popsize=4)
        best = space.apply(recipe, result.best_trial.unit)
        write_outputs(result, best, args.workdir)
        del objective
        held = HeadsObjective(recipe, held_heads, **options)
        scored = {"as written": held.metrics(recipe), "best": held.metrics(best)}
        del held
        merge(best, args.workdir / "merged", overwrite=True, threads=1)
    print(f"{args.trials} trials, best = trial {result.best}: "
          f"{json.dumps({k: round(v, 3) for k, v in result.best_trial.params.items()})}")
    for label, metrics in scored.items():
        loss = mean({t: m["loss"] for t, m in metrics.items()})
        accuracy = mean({t: m["accuracy"] for t, m in metrics.items()})
        print(f"held-out (test) {label:>10}: mean loss {loss:.4f}, mean accuracy {accuracy:.3f}")
    print(f"wrote {args.workdir}/best_recipe.yaml, trials.csv and the merged encoder "
          f"{args.workdir}/merged ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
