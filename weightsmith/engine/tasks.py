"""What a plan is made of: tasks (one per output tensor), their sources, work units, and how
the units are sized to the memory budget. Plain data; ``engine/plan.py`` builds it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from weightsmith.engine.layer_origin import LayerOrigin
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.io.safetensors_format import element_size
from weightsmith.ops.registry import MergeMethod
from weightsmith.recipe import Recipe


@dataclass(frozen=True)
class Source:
    """One input of a task: checkpoint index, key in that checkpoint, rows it really has."""

    ckpt: int
    key: str
    rows: int | None = None  # set when vocab_policy pads or truncates this input
    # engine/vocab_rows.RowGather: output rows mapped to this input's rows (a merged tokenizer)
    gather: Any = None


@dataclass
class TensorTask:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    kind: str  # "merge" or "copy"
    models: list[Source]
    base: Source | None
    params: dict[str, Any] = field(default_factory=dict)
    t: float = 0.0
    seed: int | None = None
    # checkpoint-valued parameters: name -> Source (shared) or list of Source per model;
    # None where that checkpoint lacks the tensor
    aux: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def out_bytes(self) -> int:
        return self.numel * element_size(self.out_dtype)


@dataclass(frozen=True)
class WorkUnit:
    """A task, or a block of its rows ``[start, stop)``; memory is bounded by the slots."""

    task: TensorTask
    rows: tuple[int, int] | None


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    checkpoints: list[Checkpoint]
    base_index: int | None
    model_indices: list[int]
    ref_index: int  # the checkpoint whose config, key set and tokenizer the output follows
    tasks: list[TensorTask]
    memory_budget: int
    num_layers: int | None
    units: list[WorkUnit] = field(default_factory=list)
    oversize: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    vocab: Any = None  # io/tokenizer_build.VocabAlignment when the recipe builds a tokenizer
    fill_bytes: int = 0  # vocabulary fill rows kept for the run (engine/vocab_rows.py)
    # Provenance for merge_report.json and the card: the seed random methods draw from
    # (None: the method uses none), per input ref the key prefix mapping applied
    # (strip, add), and the input tensors left out of the output (extra_keys: ignore).
    random_seed: int | None = None
    key_mappings: dict[str, tuple[str, str]] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    # What the recipe asks that mergekit would silently ignore, and other warnings (printed
    # on stderr as they arise, kept here for the Python API): weightsmith.notices.
    warnings: list[str] = field(default_factory=list)
    # Set in the output config.json over the reference's (a stacked merge's layer count).
    config_updates: dict[str, Any] = field(default_factory=dict)
    # A sliced or modules: merge's output layers, each with the input layers it comes from.
    layer_origins: list[LayerOrigin] = field(default_factory=list)

    @property
    def compute_dtype(self) -> torch.dtype:
        wanted = self.method.compute_dtype
        if wanted is not None and element_size(wanted) > element_size(self.recipe.compute_dtype):
            return wanted
        return self.recipe.compute_dtype

    @property
    def bytes_to_read(self) -> int:
        total = 0
        for task in self.tasks:
            for src in [*task.models, *([task.base] if task.base else []), *aux_sources(task)]:
                if task.kind == "copy" and src is not task.base:
                    continue
                total += self.checkpoints[src.ckpt].entry(src.key).nbytes
        return total

    @property
    def bytes_to_write(self) -> int:
        return sum(t.out_bytes for t in self.tasks)

    @property
    def peak_estimate(self) -> int:
        """Tensor memory at the busiest moment: SLOTS slots of the largest unit, one unit's
        scratch, and any oversize tensor's one-off buffers."""
        slot_bytes, scratch = bytes_per_element(self)
        merge_units = [u for u in self.units if u.task.kind == "merge"]
        fitting = [
            (u.rows[1] - u.rows[0]) * (u.task.numel // u.task.shape[0]) if u.rows else u.task.numel
            for u in merge_units
            if u.task.name not in self.oversize
        ]
        cap = max(fitting, default=0)
        biggest_oversize = max(
            (u.task.numel for u in merge_units if u.task.name in self.oversize), default=0
        )
        return SLOTS * slot_bytes * cap + scratch * max(cap, biggest_oversize) + (
            (slot_bytes * biggest_oversize) if biggest_oversize else 0
        ) + self.fill_bytes

    @property
    def out_vocab_rows(self) -> int | None:
        for task in self.tasks:
            if any(s.rows is not None or s.gather is not None for s in [*task.models, task.base] if s):
                return task.shape[0]
        return None


def aux_sources(task: TensorTask) -> list[Source]:
    """Every Source of a task's checkpoint-valued parameters."""
    out: list[Source] = []
    for value in task.aux.values():
        for src in value if isinstance(value, list) else [value]:
            if src is not None:
                out.append(src)
    return out


# Units in flight at once: one being read, one computing, one being written.
SLOTS = 3


# Largest unit, in elements, for methods that merge row blocks independently.
ELEMENTWISE_UNIT = 1 << 21


def bytes_per_element(plan: MergePlan) -> tuple[int, int]:
    """(bytes one slot holds per element, scratch a method may add per element).

    A slot holds the stacked inputs, the base and the output in the compute dtype, the cast
    output, and a staging buffer for one raw input. A method working out of place may add
    about one more stacked copy while it computes (one unit at a time).
    """
    cs = element_size(plan.compute_dtype)
    n_models = max((len(t.models) for t in plan.tasks if t.kind == "merge"), default=1)
    out_es = max((element_size(t.out_dtype) for t in plan.tasks), default=1)
    raw_es = max((c.entry(k).dtype.itemsize for c in plan.checkpoints for k in c.keys()), default=1)
    slot = (n_models + 2) * cs + out_es + raw_es
    declared = plan.method.scratch_per_element
    scratch = declared(n_models, plan.compute_dtype) if declared else None
    return slot, (n_models + 1) * cs if scratch is None else scratch


def over_budget(plan: MergePlan) -> bool:
    """A tensor the method cannot split is bigger than the budget's units, and its one-off
    buffer takes the estimated peak past the budget itself."""
    return bool(plan.oversize) and plan.peak_estimate > plan.memory_budget


def budget_that_fits(plan: MergePlan) -> int:
    """The smallest memory budget (to 1%) under which ``plan`` is not ``over_budget``."""
    slot_bytes, scratch = bytes_per_element(plan)
    fixed = plan.method.fixed_scratch(len(plan.model_indices)) if plan.method.fixed_scratch else 0
    numel = max((t.numel for t in plan.tasks if t.name in plan.oversize), default=0)
    # With this budget no tensor is oversize: split_units' capacity rule solved for numel.
    high = (numel * (SLOTS * slot_bytes + scratch) + fixed) * 5 // 4 + 5
    low = plan.memory_budget
    while high - low > max(low // 100, 1):
        mid = (low + high) // 2
        if over_budget(_with_budget(plan, mid)):
            low = mid
        else:
            high = mid
    return high


def _with_budget(plan: MergePlan, memory_budget: int) -> MergePlan:
    trial = replace(plan, memory_budget=memory_budget, units=[], oversize=[], notes=[])
    split_units(trial)
    return trial


def split_units(plan: MergePlan) -> None:
    """Cut tasks into work units so that SLOTS slots plus one unit's scratch fit the budget.

    Tensors of methods that need a whole tensor at once (``splittable`` false) stay whole; if
    one is larger than the budget allows, it is split anyway when the method can get its
    per-tensor numbers from statistics passes (``splittable_with_statistics``), else it is
    listed in ``plan.oversize`` and gets a one-off buffer when its turn comes.
    """
    slot_bytes, scratch = bytes_per_element(plan)
    per_elem = SLOTS * slot_bytes + scratch
    # A fifth of the budget is headroom for what is not a tensor buffer: the allocator's
    # slack, thread stacks, headers and bookkeeping, which the measured peak also contains.
    fixed = plan.method.fixed_scratch(len(plan.model_indices)) if plan.method.fixed_scratch else 0
    # (A budget too small for the fixed scratch still gets a fifth for the buffers.)
    capacity = max(max(plan.memory_budget * 4 // 5 - fixed, plan.memory_budget // 5) // per_elem, 1)
    for task in plan.tasks:
        if task.kind == "copy":
            plan.units.append(WorkUnit(task, None))
            continue
        rows = task.shape[0] if task.shape else 1
        elementwise = plan.method.splittable(task.params)
        can_split = elementwise or plan.method.splittable_with_statistics(task.params)
        # Elementwise methods gain nothing from units bigger than a few million elements, and
        # every byte of slot costs a page fault on first touch: cap their units (a 0.84B linear
        # merge: 5.7-6.7 s with 2M-element units vs 7.0-8.3 s with 10M).
        limit = min(capacity, ELEMENTWISE_UNIT) if elementwise else capacity
        if task.numel <= limit or not task.shape or rows <= 1 or not can_split:
            if task.numel > capacity:
                plan.oversize.append(task.name)
            plan.units.append(WorkUnit(task, None))
            continue
        row_numel = task.numel // rows
        block = max(1, limit // max(row_numel, 1))
        for start in range(0, rows, block):
            stop = min(rows, start + block)
            plan.units.append(WorkUnit(task, (start, stop)))
