"""One merged encoder scored under several task heads: a multi-task search objective.

A testbed like MiniLM's gives each task its own classifier head on a shared backbone
(``probe-<task>``), and a merge combines only the backbones (``extra_keys: ignore``). The
score of a candidate is then the mean, over tasks, of one metric taken with each task's head
on that task's data. The candidate is merged once, in memory, into the first task's model
(``Objective.merge_in_memory``); the other tasks' models load the same merged tensors by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import RecipeError
from weightsmith.search.objective import Objective, Score


@dataclass(frozen=True)
class Head:
    """A task's model folder (its head on the shared backbone) and the data it is scored on."""

    name: str
    model_dir: str | Path
    data: str | Path


def heads_from_options(given: Sequence[tuple[str, str, str]]) -> list[Head]:
    """``--head NAME MODEL_DIR DATA`` (repeated) as heads, in the order given; names must
    differ (``scores`` and ``metrics`` key each task by its name)."""
    heads = [Head(name, model_dir, data) for name, model_dir, data in given]
    seen: set[str] = set()
    for head in heads:
        if not head.name.strip():
            raise RecipeError(f"--head '' {head.model_dir} {head.data}: give the task a name "
                              "(--head NAME MODEL_DIR DATA.jsonl)")
        if head.name in seen:
            raise RecipeError(f"--head {head.name}: given twice; give each task its own name")
        seen.add(head.name)
    return heads


class HeadsObjective:
    def __init__(
        self,
        recipe: dict[str, Any],
        heads: Sequence[Head],
        task: str = "classification",
        *,
        metric: str | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        truncate: bool = False,
        memory_budget: str | int = "2GB",
        random_seed: int | None = None,
    ) -> None:
        from weightsmith.finetune.evaluator import Evaluator  # the [train] extra, loaded when used
        from weightsmith.finetune.modeling import KeyResolver

        if not heads:
            raise RecipeError("a multi-task search objective needs at least one (model, data) head")
        first, rest = heads[0], heads[1:]
        self.heads = list(heads)
        self.merger = Objective(recipe, first.data, task, metric=metric, model_dir=first.model_dir,
                                batch_size=batch_size, max_length=max_length, truncate=truncate,
                                memory_budget=memory_budget, random_seed=random_seed)
        self.others = [Evaluator(h.model_dir, h.data, task, metric=metric, batch_size=batch_size,
                                 max_length=max_length, truncate=truncate) for h in rest]
        self.metric = self.merger.evaluator.metric
        self.higher_is_better = self.merger.higher_is_better
        # The heads share one architecture: a merged tensor the first model has no parameter for
        # (a buffer such as position_ids) is not one the others can load either.
        self._resolver = KeyResolver(self.merger.evaluator.model)

    def metrics(self, recipe: dict[str, Any]) -> dict[str, dict[str, float]]:
        """Every metric of each head for ``recipe`` (accuracy, loss, ece...), merged once."""
        from weightsmith.finetune.evaluation import evaluate_features

        writer = self.merger.merge_in_memory(recipe)
        ev = self.merger.evaluator  # already holds the merged weights: score it as it stands
        with torch.no_grad():
            first = evaluate_features(ev.loaded, ev.task, ev.features, ev.batch_size,
                                      ev.metric == "exact_match")
        out = {self.heads[0].name: {k: float(v) for k, v in first.items()}}
        shared = {n: t for n, t in writer.tensors.items() if self._resolver.resolve(n) is not None}
        for head, other in zip(self.heads[1:], self.others, strict=True):
            out[head.name] = {k: float(v) for k, v in other.evaluate(shared).items()}
        return out

    def scores(self, recipe: dict[str, Any]) -> dict[str, float]:
        """Each head's score (the chosen metric) for ``recipe``."""
        return {name: m[self.metric] for name, m in self.metrics(recipe).items()}

    def __call__(self, recipe: dict[str, Any]) -> Score:
        values = list(self.scores(recipe).values())
        mean = sum(values) / len(values)
        return Score(mean, mean)
