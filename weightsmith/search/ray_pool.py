"""``weightsmith search --executor ray``: candidates scored in parallel on Ray actors.

Each actor is built once: it opens the inputs and loads its own live model (an ``Objective``),
then scores candidate after candidate, re-merging only into that model; memory per actor is
one live model plus the merge's buffers (the checkpoints are read, not held). The pool keeps
every actor busy with the generation's candidates and yields scores as they finish; the
optimizer puts them back in candidate order (population.in_order), so the trial log is the
one a sequential search writes.

An actor whose process dies is restarted by Ray (its ``Objective`` rebuilt) and the candidate
it held is scored again: a candidate's score depends only on its recipe, so the log is
unchanged. Ray is imported only here, when asked for.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from weightsmith.errors import MergeError, RecipeError, WeightsmithError
from weightsmith.notices import warn
from weightsmith.search.objective import Score
from weightsmith.search.objective_args import build_objective

# An actor whose process dies is restarted, and its candidate retried, this many times.
MAX_RESTARTS = 3
# Actors not ready after this long get a warning saying what they wait for (free CPUs).
READY_NOTE_S = 120.0

# Test-only: an actor that finds this file removes it and exits while scoring a candidate, as
# a killed node would; the restarted actor must then give the same score.
DIE_ONCE_ENV = "WEIGHTSMITH_TEST_SEARCH_DIE_ONCE"


class SearchWorker:
    """The body of one actor: an objective (``Objective``, or ``HeadsObjective`` when the
    arguments name heads) built once, scoring candidates in turn."""

    def __init__(self, cwd: str, args: dict[str, Any]) -> None:
        if Path(cwd).is_dir():  # relative paths in the recipe mean what they mean to the driver
            os.chdir(cwd)
        self.error: WeightsmithError | None = None
        try:
            self.objective = build_objective(args)
        except WeightsmithError as e:  # raised by ready(): one clear message, not a dead actor
            self.error = e

    def ready(self) -> bool:
        """Whether higher scores are better (the metric's direction), once built."""
        if self.error is not None:
            raise self.error
        return self.objective.higher_is_better

    def score(self, recipe: dict[str, Any]) -> Score:
        if self.error is not None:
            raise self.error
        marker = os.environ.get(DIE_ONCE_ENV)
        if marker and Path(marker).exists():
            Path(marker).unlink()
            os._exit(1)
        return self.objective(recipe)

    def peak_rss(self) -> int:
        """This actor's peak resident memory in bytes (Linux reports KiB)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RayPool:
    """``workers`` actors on the cluster at ``address`` (else a local one started here), each
    holding a ``build_objective(objective_args)``; by default one per cluster CPU, at most
    ``population`` (more would sit idle). Use as a context manager: the actors (and a cluster
    started here) go away on exit."""

    def __init__(self, objective_args: dict[str, Any], workers: int | None = None,
                 address: str | None = None, population: int | None = None) -> None:
        from weightsmith.engine.ray_executor import import_ray

        if workers is not None and workers < 1:
            raise RecipeError(f"--ray-workers {workers}: give at least 1")
        self.ray = ray = import_ray()
        self.started_here = not ray.is_initialized()
        if self.started_here:
            ray.init(address=address, log_to_driver=False, include_dashboard=False)
        self.actors: list[Any] = []
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))
            if workers is None:
                workers = max(1, min(cpus or 1, population or 1 << 30))
            elif workers > cpus:  # each actor holds one CPU: the extra ones would never start
                raise RecipeError(
                    f"--ray-workers {workers}: the Ray cluster has {cpus} CPU(s) and each search "
                    f"actor takes one, so {workers - cpus} would wait forever; pass --ray-workers "
                    f"{max(cpus, 1)} or fewer, or add nodes to the cluster first"
                )
            self.workers = workers
            actor = ray.remote(num_cpus=1, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
            self.actors = [actor(SearchWorker).remote(os.getcwd(), objective_args) for _ in range(workers)]
            refs = [a.ready.remote() for a in self.actors]
            _, waiting = ray.wait(refs, num_returns=len(refs), timeout=READY_NOTE_S)
            if waiting:  # say why a search sits still, rather than hang in silence
                free = int(ray.available_resources().get("CPU", 0))
                warn(f"{len(waiting)} of {workers} search actors have not started after "
                     f"{READY_NOTE_S:.0f} s: each needs one free CPU and the cluster has {free} "
                     f"free of {cpus}; other work may hold them (or pass a smaller --ray-workers)")
            # every actor built, so a bad model folder or data file fails here, once
            self.higher_is_better = self._get(refs)[0]
        except BaseException:
            self.close()
            raise

    def _get(self, refs: Any) -> Any:
        ray = self.ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, WeightsmithError):
                raise e.cause from None
            raise MergeError(f"search worker failed: {e.cause!r}") from None
        except ray.exceptions.RayActorError as e:
            raise MergeError(
                f"a search worker died {MAX_RESTARTS + 1} times (or could not start): {e}; see the Ray "
                "logs of the cluster, or run with --executor local"
            ) from None

    def evaluate(self, recipes: list[dict[str, Any]]) -> Iterator[tuple[int, Score]]:
        """Each idle actor takes the next candidate; scores come back as actors finish."""
        queue = list(enumerate(recipes))
        running: dict[Any, tuple[int, Any]] = {}  # ref -> (candidate index, actor)
        idle = list(self.actors)
        while queue or running:
            while queue and idle:
                index, recipe = queue.pop(0)
                actor = idle.pop(0)
                running[actor.score.remote(recipe)] = (index, actor)
            ready, _ = self.ray.wait(list(running), num_returns=1)
            index, actor = running.pop(ready[0])
            score = self._get(ready[0])
            idle.append(actor)
            yield index, score

    def peak_rss(self) -> list[int]:
        return self._get([a.peak_rss.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started_here:
            self.ray.shutdown()

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
