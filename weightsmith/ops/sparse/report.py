"""Report statistics of the family: additive per-tensor numbers for merge_report.json, the
finiteness check they allow, and the summary (densities, sign conflicts, norms)."""

from __future__ import annotations

import math
from typing import Any

import torch

from weightsmith.errors import NonFiniteInput
from weightsmith.ops.registry import MergeInputs


def check_finite(stats: dict[str, float], name: str) -> None:
    """Raise if an input held NaN/Inf (its sum of squares is then not finite): trimming and
    sign election could drop it silently, and the output check would never see it."""
    for key, value in stats.items():
        if key.startswith(("sq_base", "sq_model", "sq_tv")) and not math.isfinite(value):
            raise NonFiniteInput(f"tensor {name!r}: NaN/Inf in the inputs ({key})")


def _sq(x: torch.Tensor) -> float:
    # The norm in the compute dtype (torch sums float32 in cascades: ~1e-7 relative), squared
    # in double so sums over tensors stay additive; no float64 copy of a huge tensor.
    return float(torch.linalg.vector_norm(x)) ** 2 if x.numel() else 0.0


def record_inputs(stats: dict[str, float], inputs: MergeInputs, delta: torch.Tensor | None) -> None:
    """Additive per-tensor numbers about the inputs: sizes, sums of squares, non-zeros."""
    n = inputs.models[0].numel()
    stats["numel"] = float(n)
    if inputs.base is not None:
        stats["sq_base"] = _sq(inputs.base)
    for i in range(inputs.models.shape[0]):
        stats[f"sq_model[{i}]"] = _sq(inputs.models[i])
    if delta is not None:
        record_task_vectors(stats, delta)


def record_task_vectors(stats: dict[str, float], delta: torch.Tensor) -> None:
    """Additive per-tensor numbers about the task vectors: sums of squares, non-zeros."""
    for i in range(delta.shape[0]):
        stats[f"sq_tv[{i}]"] = _sq(delta[i])
        stats[f"nonzero_tv[{i}]"] = float(torch.count_nonzero(delta[i]))


def record_signs(stats: dict[str, float], weighted: torch.Tensor, elected_pos: torch.Tensor | None) -> None:
    """Coordinates where kept entries have both signs, and the elected sign balance."""
    any_pos = (weighted > 0).any(0)
    any_neg = (weighted < 0).any(0)
    stats["conflict"] = float((any_pos & any_neg).sum())
    active = any_pos | any_neg
    stats["active"] = float(active.sum())
    if elected_pos is not None:
        pos = float((elected_pos & active).sum())
        stats["elected_pos"] = pos
        stats["elected_neg"] = stats["active"] - pos


def record_output(stats: dict[str, float], inputs: MergeInputs, out: torch.Tensor) -> None:
    stats["sq_out"] = _sq(out)
    if inputs.base is not None:
        stats["sq_delta_out"] = _sq(out - inputs.base)


def summarize(totals: dict[str, float], refs: list[str], context: Any = None) -> dict[str, Any]:
    """merge_report.json's summary for this family: densities, sign conflicts, norms."""
    n = totals.get("numel", 0.0)
    out: dict[str, Any] = {"coordinates": int(n)}
    lines: list[str] = []
    models = []
    for i, ref in enumerate(refs):
        row: dict[str, Any] = {"model": ref}
        if f"kept[{i}]" in totals and n:
            row["kept_density"] = totals[f"kept[{i}]"] / n
        if f"nonzero_tv[{i}]" in totals and n:
            row["nonzero_task_vector_density"] = totals[f"nonzero_tv[{i}]"] / n
        for key, name in (("sq_tv", "task_vector_norm"), ("sq_kept", "kept_norm"), ("sq_model", "norm")):
            if f"{key}[{i}]" in totals:
                row[name] = math.sqrt(totals[f"{key}[{i}]"])
        models.append(row)
        if "kept_density" in row:
            lines.append(
                f"  {ref}: kept {row['kept_density']:.2%} of coordinates "
                f"(task vector non-zero in {row.get('nonzero_task_vector_density', 0):.2%}), "
                f"|tv| {row.get('task_vector_norm', 0):.4g} -> kept {row.get('kept_norm', 0):.4g}"
            )
    out["models"] = models
    if "conflict" in totals and n:
        out["sign_conflict_fraction"] = totals["conflict"] / n
        out["active_fraction"] = totals.get("active", 0.0) / n
        active = totals.get("active", 0.0)
        out["sign_conflict_fraction_of_active"] = totals["conflict"] / active if active else 0.0
        lines.append(
            f"  sign conflicts: {out['sign_conflict_fraction']:.2%} of coordinates "
            f"({out['sign_conflict_fraction_of_active']:.2%} of those with a kept entry)"
        )
    if "elected_pos" in totals:
        decided = totals["elected_pos"] + totals["elected_neg"]
        out["elected_positive_fraction"] = totals["elected_pos"] / decided if decided else 0.0
        lines.append(f"  elected sign: {out['elected_positive_fraction']:.2%} positive")
    norms = (("sq_base", "base_norm"), ("sq_out", "output_norm"), ("sq_delta_out", "merged_delta_norm"))
    for key, name in norms:
        if key in totals:
            out[name] = math.sqrt(totals[key])
    if "output_norm" in out:
        extra = f", |output - base| {out['merged_delta_norm']:.4g}" if "merged_delta_norm" in out else ""
        base = f"|base| {out['base_norm']:.4g}, " if "base_norm" in out else ""
        lines.append(f"  norms: {base}|output| {out['output_norm']:.4g}{extra}")
    out["lines"] = lines
    return out
