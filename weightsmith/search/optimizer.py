"""CMA-ES over a search space, with a trial log that an interrupted search resumes from.

Trial 0 is the recipe as written (its own values), so the best found is never worse than it
on the search data. Then CMA-ES (the ``cma`` package, in the unit cube, bounds [0, 1]) asks
for generations of candidates. Every evaluated trial is appended to the JSONL log (params,
unit point, scores, seed) and fsynced. On restart the same seeded optimizer is replayed: each
candidate it asks for is checked against the logged one and the logged score is told instead
of evaluating again, so a resumed search ends exactly where an uninterrupted one does.

Each generation is handed to a pool at once (population.py): sequentially here, or on Ray
actors (ray_pool.py); scores are logged and told in candidate order, so under a seed the trial
log does not depend on the pool.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from weightsmith.errors import RecipeError
from weightsmith.progress import Progress
from weightsmith.search.objective import Score
from weightsmith.search.population import CandidatePool, as_pool, in_order
from weightsmith.search.space import Space


@dataclass
class Trial:
    trial: int
    params: dict[str, float]
    unit: list[float]
    score: float
    target: float
    control: float | None
    seed: int


@dataclass
class SearchResult:
    trials: list[Trial]
    best: int  # index into trials
    higher_is_better: bool

    @property
    def best_trial(self) -> Trial:
        return self.trials[self.best]


def read_log(path: Path) -> list[dict[str, Any]]:
    """The logged trials; a last line cut short by a kill is dropped (that trial is rerun)."""
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise RecipeError(f"{path}:{i + 1}: not a trial record; the trial log is damaged") from None
    return rows


def _import_cma() -> Any:
    try:
        import cma
    except ImportError:
        raise RecipeError("recipe search needs the cma package: pip install 'weightsmith[search]'") from None
    return cma


def default_popsize(space: Space) -> int:
    """cma's default population, ``4 + floor(3 ln n)``, for this space (1-D runs as 2-D, below)."""
    return 4 + int(3 * math.log(max(len(space.dimensions), 2)))


def search(
    space: Space,
    recipe: dict[str, Any],
    objective: Callable[[dict[str, Any]], Score] | CandidatePool,
    *,
    trials: int,
    log_path: Path,
    higher_is_better: bool = True,
    seed: int = 0,
    sigma: float = 0.3,
    popsize: int | None = None,
    bar: Progress | None = None,
) -> SearchResult:
    if trials < 1:
        raise RecipeError(f"--trials {trials}: give at least 1")
    cma = _import_cma()
    import numpy as np

    pool = as_pool(objective)
    logged = read_log(log_path)
    if logged:  # drop a cut-short tail so the appends below continue a well-formed file
        log_path.write_text("".join(json.dumps(r) + "\n" for r in logged))
    done: list[Trial] = []
    sign = -1.0 if higher_is_better else 1.0  # cma minimises

    def best_index() -> int:
        ranked = [sign * t.score if not math.isnan(t.score) else math.inf for t in done]
        return min(range(len(done)), key=lambda i: (ranked[i], i))

    def replay(unit: list[float]) -> Trial:
        i = len(done)
        row = logged[i]
        if row.get("seed") != seed or len(row["unit"]) != len(unit) or any(
            abs(a - b) > 1e-12 for a, b in zip(row["unit"], unit, strict=True)
        ):
            raise RecipeError(
                f"{log_path}: trial {i} was logged by a different search (seed, space or recipe "
                "changed); resume with the same arguments or use a new --workdir"
            )
        return Trial(**{k: row[k] for k in Trial.__dataclass_fields__})

    def record(trial: Trial, fresh: bool) -> None:
        if fresh:
            with log_path.open("a") as f:
                f.write(json.dumps(asdict(trial)) + "\n")
                f.flush()
                os.fsync(f.fileno())
        done.append(trial)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(best=f"{done[best_index()].score:.4g}")

    def run(units: list[list[float]]) -> list[float]:
        """One generation: logged trials replayed (the log is a prefix of the trial sequence),
        the rest scored by the pool together and logged in candidate order."""
        units = [[min(max(float(u), 0.0), 1.0) for u in unit] for unit in units]
        start = len(done)
        n_logged = max(0, min(len(units), len(logged) - start))
        for unit in units[:n_logged]:
            record(replay(unit), fresh=False)
        fresh = units[n_logged:]
        if fresh:
            state = np.random.get_state()  # evaluation must not disturb cma's sampler
            try:
                scored = pool.evaluate([space.apply(recipe, unit) for unit in fresh])
                for k, score in in_order(scored, len(fresh)):
                    record(Trial(len(done), space.values(fresh[k]), fresh[k], score.value,
                                 score.target, score.control, seed), fresh=True)
            finally:
                np.random.set_state(state)
        return [t.score for t in done[start:]]

    run([space.default(recipe)])
    options = {"bounds": [0.0, 1.0], "seed": seed + 1,  # cma reads seed 0 as "from the clock"
               "verbose": -9, "verb_log": 0, "verb_disp": 0}
    if popsize:
        options["popsize"] = popsize
    x0 = space.default(recipe)
    # cma 4.5 fails in 1-D with bounds (tell() raises): a 1-D space gets an inert second
    # coordinate, which the objective never sees.
    inert = len(x0) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        es = cma.CMAEvolutionStrategy(x0 + [0.5] if inert else x0, sigma, options)
    while len(done) < trials:
        asked = es.ask()
        values = run([list(x[:1] if inert else x) for x in asked[: trials - len(done)]])
        if len(values) == len(asked):
            es.tell(asked, [sign * v if not math.isnan(v) else math.inf for v in values])
    return SearchResult(done, best_index(), higher_is_better)
