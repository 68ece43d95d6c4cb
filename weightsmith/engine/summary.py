"""The ``summary`` section of merge_report.json: totals of the per-tensor statistics plus the
method's own ratios (``MergeMethod.summarize``)."""

from __future__ import annotations

from typing import Any

from weightsmith.engine.run_stats import RunStats
from weightsmith.engine.tasks import MergePlan


def totals(report: dict[str, dict[str, float]]) -> dict[str, float]:
    """Sum each per-tensor statistic over tensors (methods report additive quantities)."""
    out: dict[str, float] = {}
    for tensor_stats in report.values():
        for key, value in tensor_stats.items():
            out[key] = out.get(key, 0.0) + value
    return out


def build_summary(plan: MergePlan, stats: RunStats) -> dict[str, Any] | None:
    """None when the method reported nothing and ran no statistics passes."""
    total = totals(stats.report)
    if not total and not stats.global_passes:
        return None
    summary: dict[str, Any] = {"totals": total}
    if stats.global_passes:
        summary["global_passes"] = stats.global_passes
    if plan.method.summarize is not None:
        refs = [plan.checkpoints[i].ref for i in plan.model_indices]
        summary.update(plan.method.summarize(total, refs, stats.context))
    return summary
