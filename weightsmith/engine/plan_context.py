"""What every planner function of a merge shares, built once where planning starts.

The slice, module and models planners all need the same inputs (the recipe, the method, the
opened checkpoints and which recipe ref each is, the memory budget, the random seed) and, in a
``modules:`` recipe, the module being planned (its parameters, which tensors it owns, where its
config keeps its layer count). Threading those as eight arguments through every function made
each signature a list to keep in step; one frozen ``PlanContext`` carries them instead, and a
module's context is the recipe's with the module's fields replaced (``for_module``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from weightsmith.engine.passes import describe, prepare_statistics
from weightsmith.engine.slice_layout import DEFAULT_SCOPES, Scopes
from weightsmith.engine.tasks import MergePlan, split_units
from weightsmith.errors import RecipeError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.ops.registry import MergeMethod, get_method
from weightsmith.recipe import Recipe


def keep_all(name: str) -> bool:
    return True


# Opens a checkpoint that a parameter names (a graft mask, a transfer source): its ref and the
# recipe's search_dirs. A caller that plans the same inputs many times (a search, per
# candidate) passes one that reuses what it opened before.
CheckpointOpener = Callable[[str, tuple[Path, ...]], Checkpoint]


def open_checkpoint(ref: str, search_dirs: tuple[Path, ...]) -> Checkpoint:
    return Checkpoint.open(ref, search_dirs=search_dirs)


@dataclass(frozen=True)
class PlanContext:
    """The inputs of one merge's planning (``checkpoints`` base first, then the recipe's
    models; ``by_ref``: each ref's first index there), and the module being planned."""

    recipe: Recipe
    method: MergeMethod
    checkpoints: list[Checkpoint]
    by_ref: dict[str, int]
    memory_budget: int
    random_seed: int | None = None
    # The module being planned: its name (None: the recipe's one text model), its parameters
    # (between a slice's and the global ones), the tensors it owns and its config scopes.
    module: str | None = None
    module_params: dict[str, Any] = field(default_factory=dict)
    keep: Callable[[str], bool] = keep_all
    scopes: Scopes = DEFAULT_SCOPES
    open_aux: CheckpointOpener = open_checkpoint

    @classmethod
    def create(
        cls,
        recipe: Recipe,
        checkpoints: list[Checkpoint],
        *,
        memory_budget: int,
        random_seed: int | None = None,
        method: MergeMethod | None = None,
        open_aux: CheckpointOpener = open_checkpoint,
    ) -> PlanContext:
        """``checkpoints`` opened as for any recipe: the base (if any), then ``recipe.models``;
        ``method`` stands in for the registry's ``recipe.merge_method`` when given;
        ``open_aux`` opens the checkpoints that parameters name."""
        if method is None:
            try:
                method = get_method(recipe.merge_method)
            except KeyError as e:
                raise RecipeError(str(e.args[0])) from None
        # The engine knows only the mode's name: the method says how it computes under it.
        method = method.for_numerics(recipe.numerics)
        refs = ([recipe.base_model] if recipe.base_model is not None else []) + [m.ref for m in recipe.models]
        by_ref: dict[str, int] = {}
        for i, ref in enumerate(refs):
            by_ref.setdefault(ref, i)
        return cls(recipe, method, checkpoints, by_ref, memory_budget, random_seed, open_aux=open_aux)

    def for_module(
        self,
        name: str,
        parameters: dict[str, Any],
        keep: Callable[[str], bool] = keep_all,
        scopes: Scopes = DEFAULT_SCOPES,
    ) -> PlanContext:
        return replace(self, module=name, module_params=parameters, keep=keep, scopes=scopes)

    def index(self, ref: str) -> int:
        """Where the checkpoint of recipe ref ``ref`` is in ``checkpoints``."""
        return self.by_ref[ref]

    def checkpoint(self, ref: str) -> Checkpoint:
        return self.checkpoints[self.by_ref[ref]]

    @property
    def base_index(self) -> int | None:
        """The base's checkpoint, if the recipe has one and the method uses it."""
        base = self.recipe.base_model
        return self.by_ref[base] if base is not None and self.method.base != "unused" else None


def finish_plan(plan: MergePlan) -> MergePlan:
    """The last planning steps of any plan: tasks cut into work units under the budget, the
    parameters checked by the method over all tensors, and a note if it needs statistics
    passes (engine/passes.py)."""
    split_units(plan)
    note = describe(prepare_statistics(plan))
    if note:
        plan.notes.append(note)
    return plan
