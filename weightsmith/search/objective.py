"""A candidate recipe's score: merge it into a live model (no disk) and evaluate it on data.

The model is built once, from the first input model's folder (or ``model_dir``), like a greedy
soup's evaluator, and the input checkpoints are opened once (headers read, files kept open),
the models and base and the checkpoints parameters name (a graft mask, a transfer source) alike:
each candidate is only planned over those open checkpoints and its merged tensors overwrite the
model's weights through ``MemoryWriter``; ``finetune.evaluation`` scores them. With a control
set, the score is the weighted scalarisation ``(1 - w) * target + w * control`` of the same
metric (docs/search.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.engine.executor import execute
from weightsmith.errors import RecipeError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.pipeline import plan_checkpoints
from weightsmith.plan_inputs import normalize_models
from weightsmith.recipe import Recipe, load_recipe
from weightsmith.search.memory_writer import MemoryWriter


@dataclass
class Score:
    value: float  # what the optimizer sees (the scalarisation when there is a control set)
    target: float
    control: float | None = None


class Objective:
    def __init__(
        self,
        recipe: dict[str, Any],
        data: str | Path,
        task: str,
        *,
        control: str | Path | None = None,
        control_weight: float = 0.0,
        metric: str | None = None,
        model_dir: str | Path | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        truncate: bool = False,
        memory_budget: str | int = "2GB",
        random_seed: int | None = None,
    ) -> None:
        from weightsmith.finetune.data import load_jsonl  # the [train] extra, loaded when used
        from weightsmith.finetune.encoding import encode
        from weightsmith.finetune.evaluator import Evaluator
        from weightsmith.finetune.modeling import KeyResolver

        if not 0.0 <= control_weight <= 1.0:
            raise RecipeError(f"--control-weight {control_weight}: give a number in [0, 1]")
        self.memory_budget, self.random_seed = memory_budget, random_seed
        self.inputs: dict[str, Checkpoint] = {}  # ref -> checkpoint, opened by the first plan
        # (ref, search dirs) -> a checkpoint a parameter names, opened by the first plan
        self.aux_inputs: dict[tuple[str, tuple[Path, ...]], Checkpoint] = {}
        plan = self._plan(recipe)
        root = model_dir or plan.checkpoints[plan.model_indices[0]].root
        self.evaluator = Evaluator(root, data, task, metric=metric, batch_size=batch_size,
                                   max_length=max_length, truncate=truncate)
        self.higher_is_better = self.evaluator.higher_is_better
        self.control_weight = control_weight if control is not None else 0.0
        self.control_features = None
        if control is not None:
            dataset = load_jsonl(control, task)
            self.control_features = encode(dataset, self.evaluator.loaded.tokenizer, max_length, truncate)
        self._resolver = KeyResolver(self.evaluator.model)

    def _open_inputs(self, recipe: Recipe) -> list[Checkpoint]:
        """The base then every model (``plan_inputs.open_inputs``'s order), each opened once per
        search: a candidate differs only in numbers, so its inputs are already open."""
        refs = ([recipe.base_model] if recipe.base_model is not None else []) + [m.ref for m in recipe.models]
        for ref in refs:
            if ref not in self.inputs:
                self.inputs[ref] = Checkpoint.open(ref, search_dirs=recipe.search_dirs)
        return [self.inputs[ref] for ref in refs]  # a new list: planning appends aux checkpoints

    def _open_aux(self, ref: str, search_dirs: tuple[Path, ...]) -> Checkpoint:
        """A checkpoint a parameter names, opened once per search (planning asks per candidate).
        Kept apart from ``inputs``: a merge opens an aux checkpoint on its own even when a model
        has the same ref, and the plan here is the one a merge builds."""
        key = (ref, tuple(search_dirs))
        if key not in self.aux_inputs:
            self.aux_inputs[key] = Checkpoint.open(ref, search_dirs=search_dirs)
        return self.aux_inputs[key]

    def _plan(self, recipe: dict[str, Any]) -> Any:
        parsed = normalize_models(load_recipe(recipe))
        plan = plan_checkpoints(parsed, self._open_inputs(parsed), memory_budget=self.memory_budget,
                                random_seed=self.random_seed, open_aux=self._open_aux)
        if plan.recipe.evaluation is not None or plan.recipe.calibration is not None:
            raise RecipeError(
                f"merge_method: {plan.method.name} runs a data step (evaluation:/calibration:); a "
                "search cannot tune it in memory: search a recipe without that block"
            )
        return plan

    def merge_in_memory(self, recipe: dict[str, Any]) -> MemoryWriter:
        """Merge ``recipe`` into the evaluator's model; return the writer (its ``tensors``)."""
        from weightsmith.finetune.modeling import load_weights

        plan = self._plan(recipe)
        state = self.evaluator.model.state_dict()  # shares storage with the parameters
        targets = {}
        for task in plan.tasks:
            key = self._resolver.resolve(task.name)
            if key is not None:
                targets[task.name] = state[key]
        writer = MemoryWriter(plan, targets)
        execute(plan, writer)
        # Outputs whose dtype differs from the model's (a bf16 merge into a float32 model):
        # loaded the way `weightsmith eval` would load them from disk.
        others = [(n, writer.tensors[n]) for n in targets if n not in writer.live]
        if others:
            load_weights(self.evaluator.model, others, source="merged candidate")
        return writer

    def __call__(self, recipe: dict[str, Any]) -> Score:
        from weightsmith.finetune.evaluation import evaluate_features

        self.merge_in_memory(recipe)
        ev = self.evaluator
        exact = ev.metric == "exact_match"
        with torch.no_grad():
            metrics = evaluate_features(ev.loaded, ev.task, ev.features, ev.batch_size, exact)
            target = float(metrics[ev.metric])
            if self.control_features is None:
                return Score(target, target)
            control = float(
                evaluate_features(ev.loaded, ev.task, self.control_features, ev.batch_size, exact)[ev.metric]
            )
        w = self.control_weight
        return Score((1 - w) * target + w * control, target, control)
