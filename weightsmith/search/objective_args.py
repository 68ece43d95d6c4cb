"""The objective a search's arguments describe, built where it runs (here, or in a Ray actor).

A pool is given arguments, not an objective: each Ray actor builds its own from them (plain,
picklable values: paths, numbers, ``heads.Head``), so the same dict serves both executors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from weightsmith.search.objective import Score


def build_objective(objective_args: dict[str, Any]) -> Callable[[dict[str, Any]], Score]:
    """The objective its arguments describe: ``HeadsObjective`` when they name ``heads`` (a
    multi-task score, search/heads.py), else ``Objective``."""
    if "heads" in objective_args:
        from weightsmith.search.heads import HeadsObjective

        return HeadsObjective(**objective_args)
    from weightsmith.search.objective import Objective

    return Objective(**objective_args)
