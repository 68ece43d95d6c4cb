"""Evaluating a population of candidate recipes: sequentially here, or on a pool of workers.

The optimizer hands a pool a whole generation at once (CMA-ES ``ask()``); a pool yields
``(index, score)`` pairs as candidates finish, in any order. ``in_order`` turns that stream
back into candidate order, releasing each score as soon as every earlier one is in, so the
trial log is always a prefix of the trial sequence (what resume needs) whatever the pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from weightsmith.errors import WeightsmithError
from weightsmith.search.objective import Score
from weightsmith.search.objective_args import build_objective


@runtime_checkable
class CandidatePool(Protocol):
    workers: int

    def evaluate(self, recipes: list[dict[str, Any]]) -> Iterator[tuple[int, Score]]:
        """Score every recipe; yield ``(index into recipes, score)`` as each finishes."""
        ...


class SequentialPool:
    """One objective, one candidate after another (``--executor local``)."""

    workers = 1

    def __init__(self, objective: Callable[[dict[str, Any]], Score]) -> None:
        self.objective = objective
        self.higher_is_better = getattr(objective, "higher_is_better", True)

    def close(self) -> None:
        self.objective = None  # type: ignore[assignment]  # its model is a full copy: free it

    def __enter__(self) -> SequentialPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def evaluate(self, recipes: list[dict[str, Any]]) -> Iterator[tuple[int, Score]]:
        for i, recipe in enumerate(recipes):
            yield i, self.objective(recipe)


def open_pool(executor: str, objective_args: dict[str, Any], ray_address: str | None = None,
              ray_workers: int | None = None, population: int | None = None) -> Any:
    """The pool ``--executor`` names, as a context manager: ``build_objective(objective_args)``
    here, or one per Ray actor (ray_pool.py)."""
    if executor == "ray":
        from weightsmith.search.ray_pool import RayPool

        return RayPool(objective_args, ray_workers, ray_address, population)
    return SequentialPool(build_objective(objective_args))


def as_pool(objective: Callable[[dict[str, Any]], Score] | CandidatePool) -> CandidatePool:
    return objective if isinstance(objective, CandidatePool) else SequentialPool(objective)


def in_order(finished: Iterable[tuple[int, Score]], count: int) -> Iterator[tuple[int, Score]]:
    """``finished`` (any order, each index in ``range(count)`` once) in index order."""
    waiting: dict[int, Score] = {}
    following = 0
    for index, score in finished:
        if not 0 <= index < count or index in waiting or index < following:
            raise WeightsmithError(f"search: candidate {index} of {count} was scored twice or is unknown")
        waiting[index] = score
        while following in waiting:
            yield following, waiting.pop(following)
            following += 1
    if following != count:
        raise WeightsmithError(f"search: {count - following} of {count} candidates came back without a score")
