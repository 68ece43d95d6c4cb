"""Lazy task-vector arithmetic for notebooks.

    base = Checkpoint.open("org/base")
    tv_a = Checkpoint.open("org/ft-a") - base          # a TaskVector: nothing is read yet
    tv_b = Checkpoint.open("org/ft-b") - base
    merged = base + 0.4 * (tv_a + tv_b)
    merged.save("out/")                                 # evaluated tensor by tensor, streamed

Expressions are trees over checkpoints; ``save`` runs them through the same engine, memory
budget and atomic writer as ``weightsmith merge``. ``tensor(name)`` evaluates one tensor.
Both go through the plan ``weightsmith merge`` builds (``pipeline.plan_checkpoints``), so the
lazy API maps key prefixes (a task model's ``bert.`` names onto its base's), copies integer
buffers (``position_ids``) from the reference and applies ``extra_keys`` exactly as a recipe
does. The reference, whose names and config the output takes, is the base of the first task
vector in the expression (else its first checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.dtype_names import parse_dtype
from weightsmith.engine.tasks import MergePlan, Source, TensorTask
from weightsmith.errors import MergeError, RecipeError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.ops.registry import MergeInputs, MergeMethod
from weightsmith.pipeline import DEFAULT_MEMORY_BUDGET, MergeResult, plan_checkpoints, run_plan
from weightsmith.recipe import ModelSpec, Recipe


class Expr:
    """A lazily evaluated combination of checkpoints (linear in the checkpoints)."""

    def leaves(self) -> list[Checkpoint]:
        raise NotImplementedError

    def evaluate(self, values: dict[int, torch.Tensor]) -> torch.Tensor:
        """Evaluate given each leaf's tensor, keyed by ``id`` of the leaf checkpoint."""
        raise NotImplementedError

    # arithmetic -------------------------------------------------------------
    def __add__(self, other: Any) -> Expr:
        return Sum(as_expr(self), as_expr(other), 1.0)

    def __radd__(self, other: Any) -> Expr:
        return Sum(as_expr(other), as_expr(self), 1.0)

    def __sub__(self, other: Any) -> Expr:
        a, b = as_expr(self), as_expr(other)
        if isinstance(a, Leaf) and isinstance(b, Leaf):
            return TaskVector(a, b)
        return Sum(a, b, -1.0)

    def __rsub__(self, other: Any) -> Expr:
        return as_expr(other) - self

    def __mul__(self, scalar: float) -> Expr:
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return Scaled(float(scalar), as_expr(self))

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> Expr:
        return Scaled(1.0 / float(scalar), as_expr(self))

    def __neg__(self) -> Expr:
        return Scaled(-1.0, as_expr(self))

    # evaluation --------------------------------------------------------------
    def reference(self) -> Checkpoint:
        """The checkpoint whose tensor names and config the result takes: the base of the
        first task vector in the expression, else its first checkpoint."""
        return next(iter(self.task_vector_bases()), self.leaves()[0])

    def task_vector_bases(self) -> list[Checkpoint]:
        return []

    def inputs(self) -> list[Checkpoint]:
        """Every checkpoint once, the reference first (the order the plan takes them in)."""
        ref = self.reference()
        return [ref, *(c for c in _unique(self.leaves()) if c is not ref)]

    def plan(self, *, extra_keys: str = "ignore", memory_budget: str | int = DEFAULT_MEMORY_BUDGET,
             out_dtype: torch.dtype | str | None = None) -> MergePlan:
        """The merge plan of this expression, as ``weightsmith plan`` would show it."""
        return plan_expression(self, extra_keys=extra_keys, memory_budget=memory_budget, out_dtype=out_dtype)

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Evaluate one tensor in ``dtype`` (float32 by default), by the reference's name (a
        name with an input's prefix, such as ``bert.``, is accepted too). Integer buffers come
        from the reference unchanged, as ``save`` writes them."""
        plan = self._cached_plan()
        task = find_task(plan, name)
        if task.kind != "merge":
            assert task.base is not None
            return plan.checkpoints[task.base.ckpt].read(task.base.key)
        leaves = plan.checkpoints
        values = {
            id(leaves[s.ckpt]): _read_rows(leaves[s.ckpt], s, task.shape).to(dtype) for s in task.models
        }
        return self.evaluate(values)

    def keys(self) -> list[str]:
        """The output's tensor names (the reference's), in the order ``save`` writes them."""
        return [t.name for t in self._cached_plan().tasks]

    def _cached_plan(self) -> MergePlan:
        # Headers only, but planning checks every tensor: do it once per expression.
        cached = self.__dict__.get("_plan")
        if cached is None:
            cached = self.__dict__["_plan"] = self.plan()
        return cached

    def save(
        self,
        out: str | Path,
        *,
        out_dtype: torch.dtype | str | None = None,
        **options: Any,
    ) -> MergeResult:
        """Write the expression's value as a model folder (options as ``weightsmith.merge``)."""
        return save_expression(self, out, out_dtype=out_dtype, **options)


def as_expr(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, Checkpoint):
        return Leaf(value)
    raise TypeError(f"cannot combine {type(value).__name__} with a model; use checkpoints and numbers")


def _unique(items: list[Checkpoint]) -> list[Checkpoint]:
    seen: dict[int, Checkpoint] = {}
    for c in items:
        seen.setdefault(id(c), c)
    return list(seen.values())


@dataclass(eq=False)
class Leaf(Expr):
    ckpt: Checkpoint

    def leaves(self) -> list[Checkpoint]:
        return [self.ckpt]

    def evaluate(self, values: dict[int, torch.Tensor]) -> torch.Tensor:
        return values[id(self.ckpt)]

    def __repr__(self) -> str:
        return self.ckpt.ref


@dataclass(eq=False)
class Sum(Expr):
    a: Expr
    b: Expr
    sign: float

    def leaves(self) -> list[Checkpoint]:
        return self.a.leaves() + self.b.leaves()

    def task_vector_bases(self) -> list[Checkpoint]:
        return self.a.task_vector_bases() + self.b.task_vector_bases()

    def evaluate(self, values: dict[int, torch.Tensor]) -> torch.Tensor:
        a, b = self.a.evaluate(values), self.b.evaluate(values)
        return a + b if self.sign > 0 else a - b

    def __repr__(self) -> str:
        return f"({self.a!r} {'+' if self.sign > 0 else '-'} {self.b!r})"


@dataclass(eq=False, repr=False)
class TaskVector(Sum):
    """``finetuned - base``: the direction fine-tuning moved the weights."""

    def __init__(self, finetuned: Leaf, base: Leaf) -> None:
        super().__init__(finetuned, base, -1.0)

    def task_vector_bases(self) -> list[Checkpoint]:
        return [self.base]

    @property
    def finetuned(self) -> Checkpoint:
        assert isinstance(self.a, Leaf)
        return self.a.ckpt

    @property
    def base(self) -> Checkpoint:
        assert isinstance(self.b, Leaf)
        return self.b.ckpt

    def norm(self) -> float:
        """L2 norm over all floating tensors, streamed (one tensor in memory at a time)."""
        total = 0.0
        for task in self._cached_plan().tasks:
            if task.kind == "merge":
                total += float(self.tensor(task.name).double().pow(2).sum())
        return total**0.5


@dataclass(eq=False)
class Scaled(Expr):
    scale: float
    inner: Expr

    def leaves(self) -> list[Checkpoint]:
        return self.inner.leaves()

    def task_vector_bases(self) -> list[Checkpoint]:
        return self.inner.task_vector_bases()

    def evaluate(self, values: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.scale * self.inner.evaluate(values)

    def __repr__(self) -> str:
        return f"{self.scale:g} * {self.inner!r}"


def check_same_keys(leaves: list[Checkpoint]) -> None:
    first = leaves[0]
    for other in leaves[1:]:
        missing = [k for k in first.keys() if k not in other]
        extra = [k for k in other.keys() if k not in first]
        if missing or extra:
            what = f"lacks {missing[:3]}" if missing else f"has extra {extra[:3]}"
            raise MergeError(
                f"model {other.ref!r} ({other.root}) {what} compared with {first.ref!r}; "
                "arithmetic needs checkpoints of one architecture"
            )
        for k in first.keys():
            if first.entry(k).shape != other.entry(k).shape:
                raise MergeError(
                    f"model {other.ref!r}: tensor {k!r} has shape {list(other.entry(k).shape)} "
                    f"but {first.ref!r} has {list(first.entry(k).shape)}"
                )


def plan_expression(
    expr: Expr,
    *,
    extra_keys: str = "error",
    memory_budget: str | int = DEFAULT_MEMORY_BUDGET,
    out_dtype: torch.dtype | str | None = None,
) -> MergePlan:
    """Plan an expression as ``weightsmith merge`` plans a recipe: every checkpoint is a model
    (the reference first), the expression is the method."""
    leaves = expr.inputs()
    if isinstance(out_dtype, str):
        out_dtype = parse_dtype(out_dtype, "out_dtype")
    if extra_keys not in ("error", "ignore"):
        raise RecipeError(f"extra_keys={extra_keys!r}: use 'error' or 'ignore'")
    slot = {id(c): i for i, c in enumerate(leaves)}

    def evaluate(inputs: MergeInputs) -> torch.Tensor:
        return expr.evaluate({key: inputs.models[i] for key, i in slot.items()})

    method = MergeMethod(
        name="expression",
        fn=evaluate,
        params=(),
        base="unused",
        summary=f"checkpoint arithmetic: {expr!r}",
    )
    raw = {"expression": repr(expr), "models": [c.ref for c in leaves], "extra_keys": extra_keys}
    recipe = Recipe(
        "expression", [ModelSpec(c.ref) for c in leaves], out_dtype=out_dtype, extra_keys=extra_keys, raw=raw
    )
    return plan_checkpoints(recipe, list(leaves), memory_budget=memory_budget, method=method)


def save_expression(
    expr: Expr,
    out: str | Path,
    *,
    out_dtype: torch.dtype | str | None = None,
    memory_budget: str | int = DEFAULT_MEMORY_BUDGET,
    extra_keys: str = "error",
    **options: Any,
) -> MergeResult:
    """Stream a lazy checkpoint expression (``base + 0.4 * tv``) into a model folder.

    ``extra_keys="ignore"`` drops tensors only the fine-tunes have (a task head), as the
    recipe field does; the default refuses them, naming them."""
    plan = plan_expression(expr, extra_keys=extra_keys, memory_budget=memory_budget, out_dtype=out_dtype)
    return run_plan(plan, out, **options)


def find_task(plan: MergePlan, name: str) -> TensorTask:
    """The plan's task for ``name``: the reference's name, or an input's prefixed one."""
    by_name = {t.name: t for t in plan.tasks}
    if name in by_name:
        return by_name[name]
    for task in plan.tasks:  # a name as an input spells it (bert.encoder... for encoder...)
        if any(s.key == name for s in task.models):
            return task
    ref = plan.checkpoints[plan.ref_index]
    close = [t for t in by_name if t.endswith(name.split(".", 1)[-1])][:3]
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise MergeError(
        f"no tensor {name!r} in the merge: the output takes the names of {ref.ref!r}{hint}"
    )


def _read_rows(ckpt: Checkpoint, src: Source, shape: tuple[int, ...]) -> torch.Tensor:
    """One input's tensor as the plan sees it (vocab_policy may pad or truncate rows)."""
    value = ckpt.read(src.key)
    if src.rows is None or src.rows == shape[0]:
        return value
    if src.rows > shape[0]:
        return value[: shape[0]]
    padded = value.new_zeros(shape)
    padded[: src.rows] = value
    return padded


# Checkpoint arithmetic (``base + 0.4 * (ft - base)``) is this module's: the reading layer
# (io/) knows nothing of expressions, so the operators are attached here.
def _arith(name: str):  # noqa: ANN202 - builds Checkpoint's operator methods
    def op(self: Checkpoint, *args: Any) -> Any:
        return getattr(Leaf(self), name)(*args)

    op.__name__ = name
    return op


for _op in (
    "__add__",
    "__radd__",
    "__sub__",
    "__rsub__",
    "__mul__",
    "__rmul__",
    "__neg__",
    "__truediv__",
):
    setattr(Checkpoint, _op, _arith(_op))
