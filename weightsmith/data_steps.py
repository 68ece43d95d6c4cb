"""Data-dependent steps that some merge methods run once, before the streamed merge.

Operators stay pure functions of tensors (ops/registry.py). A few methods need numbers that
only running models on data can give:

- ``soup`` with ``mode: greedy`` scores candidate soups on held-out data (``evaluation:``) and
  keeps the ingredients that help; the streamed merge then averages the chosen ones.
- ``antidote`` needs the fine-tune's input-feature norms on a harmful calibration set
  (``calibration:``) for its Wanda scores.

``check_data_blocks`` (plan time, no data) rejects blocks a method does not use;
``run_data_steps`` (merge time) runs the step and hands its result to the operator as
``inputs.context`` by binding it into the method's ``prepare`` hook: the engine then gets a
"global statistic" that needs no pass over the inputs, so nothing in the engine knows about
data. Both need the ``[train]`` extra (transformers), imported only here, only when used.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from weightsmith.engine.tasks import MergePlan
from weightsmith.errors import RecipeError
from weightsmith.greedy_soup import greedy_soup
from weightsmith.ops.antidote import AntidoteContext
from weightsmith.ops.registry import MergeInputs
from weightsmith.ops.soup import GreedySelection
from weightsmith.ops.statistics import GlobalStatistics

Log = Callable[[str], None]

# merge_method -> the data block it reads (a block given to any other method is an error).
USES_BLOCK = {"evaluation": ("soup",), "calibration": ("antidote",)}


class Precomputed(GlobalStatistics):
    """A method's context computed before the merge: no pass over the inputs needed."""

    planned_passes = 0

    def __init__(self, value: Any) -> None:
        self.value = value

    def wants_pass(self) -> bool:
        return False

    def collect(self, inputs: MergeInputs, **params: Any) -> Any:  # pragma: no cover - never asked
        raise AssertionError("precomputed statistics take no pass")

    def absorb(self, total: Any) -> None:  # pragma: no cover - never asked
        raise AssertionError("precomputed statistics take no pass")

    def result(self) -> Any:
        return self.value


def bind_context(plan: MergePlan, value: Any) -> None:
    """Make ``value`` the operator's ``inputs.context`` for this plan's execution."""
    original = plan.method.prepare

    def prepare(specs: list[Any], dtype: torch.dtype) -> Precomputed:
        if original is not None:
            original(specs, dtype)  # the same parameter checks as at plan time
        return Precomputed(value)

    plan.method = dataclasses.replace(plan.method, prepare=prepare)


def _uniform_param(plan: MergePlan, name: str) -> Any:
    """A parameter the method's prepare hook already checked is the same for every tensor."""
    for task in plan.tasks:
        if task.kind == "merge":
            return task.params[name]
    return plan.method.param(name).default if plan.method.param(name) else None


def check_data_blocks(plan: MergePlan) -> None:
    """Plan-time checks (no data read): every data block is used, every needed one is there."""
    recipe = plan.recipe
    name = plan.method.name
    for block, users in USES_BLOCK.items():
        if getattr(recipe, block) is not None and name not in users:
            raise RecipeError(
                f"`{block}:` is not used by merge_method: {name} (it is for {', '.join(users)})"
            )
    if name == "soup":
        mode = _uniform_param(plan, "mode")
        if recipe.base_model is not None:
            raise RecipeError(
                "soup averages the models listed under `models`; it has no base_model (list the "
                "pre-trained model under models to make it an ingredient)"
            )
        if mode == "greedy" and recipe.evaluation is None:
            raise RecipeError(
                "soup mode: greedy needs held-out data: add `evaluation: {data: VAL.jsonl, task: "
                "classification | causal-lm, metric: ...}`"
            )
        if mode != "greedy" and recipe.evaluation is not None:
            raise RecipeError(
                "`evaluation:` is used by soup mode: greedy only; remove it or set mode: greedy"
            )
    if name == "antidote":
        score = _uniform_param(plan, "score")
        target = _uniform_param(plan, "target")
        if score == "wanda" and recipe.calibration is None:
            raise RecipeError(
                "antidote score: wanda needs harmful calibration data: add `calibration: {data: "
                "HARMFUL.jsonl, task: causal-lm}` (or use score: magnitude | random)"
            )
        if target == "delta" and plan.base_index is None:
            raise RecipeError(
                "antidote target: delta resets entries to the aligned model: set base_model to it "
                "(or use target: weights, which zeroes them)"
            )
        if recipe.calibration is None and not _uniform_param(plan, "modules"):
            raise RecipeError(
                "antidote without calibration data cannot tell linear layers from embeddings: set "
                "parameters.modules to a regex of the weights to prune (e.g. 'self_attn')"
            )


def run_data_steps(plan: MergePlan, replan: Callable[[Any], MergePlan], log: Log | None = None) -> MergePlan:
    """Run the method's data step, if it has one; return the plan to execute.

    ``replan(recipe)`` builds a plan for a changed recipe (a greedy soup's chosen ingredients)
    with the caller's memory budget and options.
    """
    check_data_blocks(plan)
    name = plan.method.name
    if name == "soup" and _uniform_param(plan, "mode") == "greedy":
        return _greedy_soup(plan, replan, log)
    if name == "antidote":
        bind_context(plan, _antidote_context(plan, log))
    return plan


# --------------------------------------------------------------------------- greedy soup
def _ingredient_loader(plan: MergePlan) -> Callable[[int], Iterator[tuple[str, torch.Tensor]]]:
    tasks = [t for t in plan.tasks if t.kind == "merge"]
    dtype = plan.compute_dtype

    def load(i: int) -> Iterator[tuple[str, torch.Tensor]]:
        for task in tasks:
            src = task.models[i]
            if src.rows is not None or src.gather is not None:
                raise RecipeError(
                    f"greedy soup: {plan.checkpoints[src.ckpt].ref} has a different vocabulary size "
                    "(or a tokenizer merge realigns its rows); ingredients must share one architecture "
                    "and tokenizer"
                )
            tensor = plan.checkpoints[src.ckpt].read(src.key)
            yield task.name, tensor.to(dtype)

    return load


def _greedy_soup(plan: MergePlan, replan: Callable[[Any], MergePlan], log: Log | None) -> MergePlan:
    from weightsmith.finetune.evaluator import Evaluator  # the [train] extra, loaded when used

    recipe = plan.recipe
    block = dict(recipe.evaluation or {})
    refs = [plan.checkpoints[i].ref for i in plan.model_indices]
    first = plan.checkpoints[plan.model_indices[0]].root
    # The evaluator's folder supplies what the ingredients do not (a probe head, say).
    model_dir = recipe.data_path(block["model"]) if "model" in block else first
    started = time.perf_counter()
    evaluator = Evaluator(
        model_dir,
        recipe.data_path(block["data"]),
        block["task"],
        metric=block.get("metric"),
        batch_size=block.get("batch_size", 32),
        max_length=block.get("max_length", 512),
        truncate=block.get("truncate", False),
    )
    metric, higher = evaluator.metric, evaluator.higher_is_better
    result = greedy_soup(len(refs), _ingredient_loader(plan), evaluator.score, higher, log, names=refs)
    del evaluator  # its model is a full copy: free it before the streamed merge
    chosen = [refs[i] for i in result.chosen]
    position = {i: r for r, i in enumerate(result.order)}
    selection = GreedySelection(
        metric=metric,
        higher_is_better=higher,
        evaluation={**block, "model": str(model_dir)},
        ingredients=tuple(
            {"model": refs[i], "score": s, "rank": position[i]} for i, s in enumerate(result.scores)
        ),
        steps=tuple(
            {"model": refs[i], "candidate_score": s, "accepted": ok, "soup_size": _size_after(result, k)}
            for k, (i, s, ok) in enumerate(result.steps)
        ),
        chosen=tuple(chosen),
        score=result.score,
        seconds=time.perf_counter() - started,
    )
    by_ref = {m.ref: m for m in recipe.models}
    subset = dataclasses.replace(recipe, models=[by_ref[r] for r in chosen])
    new_plan = replan(subset)
    bind_context(new_plan, selection)
    return new_plan


def _size_after(result: Any, step: int) -> int:
    return 1 + sum(1 for _, _, ok in result.steps[: step + 1] if ok)


# --------------------------------------------------------------------------- antidote
def _antidote_context(plan: MergePlan, log: Log | None) -> Any:

    recipe = plan.recipe
    modules = _uniform_param(plan, "modules") or ""
    pattern = re.compile(modules)
    candidates = [t for t in plan.tasks if t.kind == "merge" and len(t.shape) == 2 and pattern.search(t.name)]
    norms: dict[str, torch.Tensor] = {}
    calibration = None
    skipped: list[str] = []
    if recipe.calibration is not None:
        from weightsmith.finetune.probes import feature_norms

        block = recipe.calibration
        model_dir = plan.checkpoints[plan.model_indices[0]].root
        if log:
            log(f"antidote: input-feature norms of {model_dir} on {block['data']}")
        started = time.perf_counter()
        module_norms = feature_norms(
            model_dir,
            recipe.data_path(block["data"]),
            block["task"],
            batch_size=block.get("batch_size", 16),
            max_length=block.get("max_length", 512),
            truncate=block.get("truncate", False),
        )
        calibration = {**block, "model": str(model_dir), "seconds": round(time.perf_counter() - started, 3)}
        eligible = []
        for task in candidates:
            key = task.models[0].key  # the fine-tune's own name for it: feature_norms' naming
            norm = module_norms.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
            if norm is None or norm.numel() != task.shape[1]:
                skipped.append(task.name)  # not the weight of a linear layer the data ran through
                continue
            eligible.append(task.name)
            norms[task.name] = norm
    else:
        eligible = [t.name for t in candidates]
    if not eligible:
        raise RecipeError(
            f"antidote: no tensor is eligible (parameters.modules {modules!r} matches no 2-D "
            "linear-layer weight of the model); check the regex against `weightsmith inspect --keys`"
        )
    if modules == "":
        skipped = []  # the default means "every linear layer": the rest is not worth a list
    return AntidoteContext(frozenset(eligible), norms, calibration, tuple(skipped))
