"""What `weightsmith plan` prints: a summary and one line per distinct parameter setting
(tensors grouped, layers as ranges), or with ``verbose`` one line per tensor; numbers rounded
for people (0.6, not 0.6000000000000001), parameters the method ignores left out. Also
``--json``'s rows, the device line and a multi-stage recipe's stage lines."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import click

from weightsmith.dtype_names import dtype_name
from weightsmith.engine.keys import layer_index
from weightsmith.lora_output import refactor_plan
from weightsmith.units import format_size

if TYPE_CHECKING:
    from weightsmith.engine.tasks import MergePlan, TensorTask

SIGNIFICANT = 6  # digits a person reads; --json keeps every digit


def number(value: Any) -> str:
    """A parameter value as a person reads it: floats to 6 significant digits, lists too."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "none"
    if isinstance(value, float):
        return f"{value:.{SIGNIFICANT}g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(number(v) for v in value) + "]"
    return str(value)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def shown_params(plan: MergePlan, task: TensorTask) -> str:
    ignored = {p.name for p in plan.method.params if p.ignored}
    return ", ".join(f"{k}={number(v)}" for k, v in task.params.items() if k not in ignored)


def layer_ranges(layers: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    out: list[str] = []
    ordered = sorted(set(layers))
    start = prev = None
    for i in [*ordered, None]:
        if start is not None and (i is None or i != prev + 1):
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(out)


def describe_tensors(names: list[str]) -> str:
    """``layers 0-5 (6 x 16 tensors)``, ``embeddings.* (4)``, ``pooler.dense.weight``."""
    by_layer: dict[int, int] = {}
    others: dict[str, list[str]] = {}
    for name in names:
        layer = layer_index(name)
        if layer is not None:
            by_layer[layer] = by_layer.get(layer, 0) + 1
        else:
            others.setdefault(name.split(".", 1)[0], []).append(name)
    parts = []
    if by_layer:
        counts = set(by_layer.values())
        if len(by_layer) == 1:
            parts.append(f"layer {layer_ranges(by_layer)} ({plural(counts.pop(), 'tensor')})")
        else:
            each = f"{counts.pop()} each" if len(counts) == 1 else plural(sum(by_layer.values()), "tensor")
            parts.append(f"layers {layer_ranges(by_layer)} ({each})")
    for head, group in others.items():
        parts.append(group[0] if len(group) == 1 else f"{head}.* ({len(group)})")
    return "; ".join(parts)


def grouped_lines(plan: MergePlan) -> list[str]:
    """One line per distinct (operator, parameters) setting, in plan order."""
    blocks = _blocks(plan)
    groups: dict[tuple[str, str], list[TensorTask]] = {}
    for task in plan.tasks:
        if task.kind == "merge":
            key = (f"{plan.method.name}", shown_params(plan, task))
        else:
            key = ("copy", "")
        groups.setdefault(key, []).append(task)
    lines = []
    for (operator, params), tasks in groups.items():
        split = sum(1 for t in tasks if blocks.get(t.name, 1) > 1)
        rows = f", {split} in row blocks" if split else ""
        head = f"{operator}({params})" if params else f"{operator} (non-float, from the reference)"
        what = describe_tensors([t.name for t in tasks])
        lines.append(f"{head}: {plural(len(tasks), 'tensor')}{rows}: {what}")
    return lines


def tensor_lines(plan: MergePlan) -> list[str]:
    """One line per tensor (``--verbose``)."""
    refs = [c.ref for c in plan.checkpoints]
    blocks = _blocks(plan)
    lines = []
    for task in plan.tasks:
        dtype = dtype_name(task.out_dtype)
        if task.kind != "merge":
            source = f" from {refs[task.base.ckpt]}" if task.base else ""
            lines.append(f"{task.name} {list(task.shape)} {dtype} <- copy (non-float){source}")
            continue
        params = shown_params(plan, task)
        n = blocks.get(task.name, 1)
        lines.append(
            f"{task.name} {list(task.shape)} {dtype} <- {plan.method.name}({len(task.models)} models"
            f"{', base' if task.base else ''}) t={number(round(task.t, 4))}"
            f"{' ' + params if params else ''}{f' in {n} row blocks' if n > 1 else ''}"
        )
    return lines


def summary_lines(plan: MergePlan) -> list[str]:
    refs = [c.ref for c in plan.checkpoints]
    merged = sum(1 for t in plan.tasks if t.kind == "merge")
    lines = [
        f"method:          {plan.method.name} ({plan.method.summary})",
        f"inputs:          {', '.join(refs)}",
        f"tensors:         {len(plan.tasks)} ({merged} merged, {len(plan.tasks) - merged} copied)",
        f"bytes to read:   {format_size(plan.bytes_to_read)}",
        f"bytes to write:  {format_size(plan.bytes_to_write)}",
        f"memory budget:   {format_size(plan.memory_budget)}; estimated peak tensor memory "
        f"{format_size(plan.peak_estimate)} (plus ~0.4 GB for Python and torch)",
    ]
    if plan.random_seed is not None:
        lines.append(f"random seed:     {plan.random_seed} (--random-seed)")
    for ref, names in plan.dropped.items():
        if plan.recipe.extra_keys == "ignore":
            lines.append(f"left out:        {plural(len(names), 'tensor')} of {ref} (extra_keys: ignore): "
                         f"{describe_tensors(names)}")
    lines += [f"note:            {note}" for note in plan.notes]
    refactor = refactor_plan(plan)  # out_format: lora: the adapter's SVDs, exact (the largest)
    return lines + (refactor.lines() if refactor is not None else [])


def _blocks(plan: MergePlan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for unit in plan.units:
        counts[unit.task.name] = counts.get(unit.task.name, 0) + 1
    return counts


def plan_json(plan: Any) -> dict[str, Any]:
    """`weightsmith plan --json`: the summary and one row per tensor."""
    refs = [c.ref for c in plan.checkpoints]
    rows = []
    for task in plan.tasks:
        rows.append(
            {
                "tensor": task.name,
                "shape": list(task.shape),
                "dtype": dtype_name(task.out_dtype),
                "operator": plan.method.name if task.kind == "merge" else "copy (non-float)",
                "base": f"{refs[task.base.ckpt]}:{task.base.key}" if task.base else None,
                "inputs": [f"{refs[s.ckpt]}:{s.key}" for s in task.models],
                "params": task.params,
                "t": round(task.t, 4),
                "blocks": sum(1 for u in plan.units if u.task is task),
            }
        )
    summary = {
        "merge_method": plan.method.name,
        "numerics": plan.recipe.numerics,
        "compute_dtype": dtype_name(plan.compute_dtype),
        "tensors": len(plan.tasks),
        "bytes_to_read": plan.bytes_to_read,
        "bytes_to_write": plan.bytes_to_write,
        "memory_budget": plan.memory_budget,
        "estimated_peak_bytes": plan.peak_estimate,
        "over_budget_tensors": plan.oversize,
        "random_seed": plan.random_seed,
        "key_mappings": {ref: list(p) for ref, p in plan.key_mappings.items()},
        "dropped_tensors": plan.dropped,
        "notes": plan.notes,
        "warnings": plan.warnings,
    }
    refactor = refactor_plan(plan)
    if refactor is not None:
        summary["lora_refactor"] = refactor.as_dict()
    return {"summary": summary, "tensors": rows}


def device_line(on_device: dict[str, Any]) -> str:
    """`weightsmith plan` on a device (``devices.device_summary``): slot sizes against the device
    budget, packed launches."""
    budget, kernels = on_device["device_memory_budget"], on_device["kernels"]
    return (
        f"device:          {on_device['device']} (kernels: {kernels}); a device slot "
        f"{format_size(on_device['device_slot_bytes'])} + scratch "
        f"{format_size(on_device['device_scratch_bytes'])}, three slots "
        f"{format_size(on_device['device_bytes_for_all_slots'])} of "
        f"{format_size(budget) if budget is not None else '4/5 of the free device memory'}; "
        f"{on_device['packed_tensors']} small tensors in {on_device['packed_launches']} packed launches"
    )


def plan_stages_report(
    recipe: str,
    stage: str | None,
    stage_cache: str | None,
    strict: bool,
    options: dict[str, Any],
    rows: list[dict[str, Any]],
    echo: bool,
) -> Any:
    """Print a multi-stage recipe's stages (filling ``rows``); the final stage's plan or None."""
    from weightsmith.stages import plan_stages

    planned = plan_stages(recipe, stage=stage, stage_cache=stage_cache, strict=strict, **options)
    for k, row in enumerate(planned, 1):
        r = row.recipe
        final = k == len(planned)
        state = (
            "final: written to OUT" if final and row.plan is not None
            else f"cached in {row.folder}" if row.cached
            else f"to run, into {row.folder}" if row.folder is not None
            else "planned once the stages it uses have run"
        )
        uses = ", ".join(row.stage.needs) or "-"
        rows.append({"stage": row.stage.name, "merge_method": r.merge_method, "uses": row.stage.needs,
                     "models": [m.ref for m in r.models], "state": state})
        if echo:
            click.echo(f"stage {k}/{len(planned)} {row.stage.label}: {r.merge_method} of "
                       f"{len(r.models)} model(s); uses stages: {uses}; {state}")
    if echo:
        click.echo("")
    return planned[-1].plan
