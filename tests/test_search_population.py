"""Population batching without Ray: a generation goes to the pool at once, scores come back in
any order and are logged and told in candidate order, so the trial log does not depend on the
pool; resume replays the logged prefix and asks the pool only for the rest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from weightsmith.errors import WeightsmithError
from weightsmith.search.objective import Score
from weightsmith.search.population import SequentialPool, in_order
from weightsmith.search.space import Space

pytest.importorskip("cma")

SPACE = Space.parse({"models[0].parameters.weight": [0, 1], "models[1].parameters.weight": [0, 1]})
RECIPE = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.2}},
                                               {"model": "b", "parameters": {"weight": 0.8}}]}


def score_of(recipe: dict) -> Score:
    """A smooth score with its optimum at weights (0.7, 0.1): no model needed."""
    a, b = (m["parameters"]["weight"] for m in recipe["models"])
    value = -((a - 0.7) ** 2) - (b - 0.1) ** 2
    return Score(value, value)


class ShuffledPool:
    """A fake pool of ``workers``: each generation finishes in reverse order; it records the
    generation sizes it was given, and can fail in generation ``fail_in`` after 2 scores."""

    def __init__(self, workers: int = 3, fail_in: int | None = None) -> None:
        self.workers = workers
        self.higher_is_better = True
        self.batches: list[int] = []
        self.fail_in = fail_in

    def evaluate(self, recipes):
        self.batches.append(len(recipes))
        for n, i in enumerate(reversed(range(len(recipes)))):
            if len(self.batches) - 1 == self.fail_in and n == 2:
                raise WeightsmithError("worker lost")
            yield i, score_of(recipes[i])


def run(pool, log: Path, trials: int = 11, seed: int = 0):
    from weightsmith.search.optimizer import search

    return search(SPACE, RECIPE, pool, trials=trials, log_path=log, seed=seed, popsize=4)


def test_in_order_releases_each_score_once_every_earlier_one_is_in() -> None:
    s = [Score(float(i), float(i)) for i in range(4)]
    got = []
    stream = in_order(iter([(2, s[2]), (0, s[0]), (3, s[3]), (1, s[1])]), 4)
    got.append(next(stream))  # 0 is released as soon as it is in, before 1 arrives
    assert got == [(0, s[0])]
    got += list(stream)
    assert [i for i, _ in got] == [0, 1, 2, 3] and [x.value for _, x in got] == [0, 1, 2, 3]
    with pytest.raises(WeightsmithError, match="scored twice"):
        list(in_order(iter([(0, s[0]), (0, s[0])]), 2))
    with pytest.raises(WeightsmithError, match="without a score"):
        list(in_order(iter([(1, s[1])]), 2))


def test_a_shuffled_pool_writes_the_sequential_trial_log(tmp_path: Path) -> None:
    sequential = run(score_of, tmp_path / "seq.jsonl")
    pool = ShuffledPool()
    pooled = run(pool, tmp_path / "pool.jsonl")
    # Trial 0 alone, then whole CMA-ES generations (popsize 4); the last one cut to the budget.
    assert pool.batches == [1, 4, 4, 2]
    assert (tmp_path / "pool.jsonl").read_text() == (tmp_path / "seq.jsonl").read_text()
    assert [t.unit for t in pooled.trials] == [t.unit for t in sequential.trials]
    assert pooled.best == sequential.best
    assert pooled.best_trial.score > pooled.trials[0].score  # CMA-ES was told the right scores


def test_sequential_pool_scores_in_candidate_order() -> None:
    seen = []

    def objective(recipe):
        seen.append(recipe["models"][0]["parameters"]["weight"])
        return score_of(recipe)

    recipes = [SPACE.apply(RECIPE, [w, 0.5]) for w in (0.1, 0.9, 0.4)]
    out = list(SequentialPool(objective).evaluate(recipes))
    assert [i for i, _ in out] == [0, 1, 2] and seen == [0.1, 0.9, 0.4]
    assert all(math.isclose(s.value, score_of(r).value) for (_, s), r in zip(out, recipes, strict=True))


def test_a_pool_failing_mid_generation_leaves_a_log_that_resumes_to_the_same_end(tmp_path: Path) -> None:
    full = tmp_path / "full.jsonl"
    run(score_of, full)
    log = tmp_path / "cut.jsonl"
    # Trial 0 and generation 1 go through; generation 2 fails after its last two candidates
    # finished (reverse order), so nothing of it can be logged: the log stays a prefix.
    with pytest.raises(WeightsmithError, match="worker lost"):
        run(ShuffledPool(fail_in=2), log)
    lines = log.read_text().splitlines()
    assert [json.loads(line)["trial"] for line in lines] == list(range(5))
    assert full.read_text().startswith(log.read_text())
    resumed_pool = ShuffledPool()
    run(resumed_pool, log)
    assert resumed_pool.batches == [4, 2]  # only what the log lacked
    assert log.read_text() == full.read_text()
