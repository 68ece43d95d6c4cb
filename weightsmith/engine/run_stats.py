"""What a run did: bytes, tensors, per-tensor report statistics, passes and stage timings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunStats:
    bytes_read: int = 0
    bytes_written: int = 0
    tensors: int = 0
    report: dict[str, dict[str, float]] = field(default_factory=dict)
    # Model-wide statistics passes run before the output pass (engine/passes.py), what they
    # read, and their result (handed to the method as ``inputs.context``).
    global_passes: int = 0
    global_bytes_read: int = 0
    context: Any = None
    # merge_report.json's summary (engine/summary.py), filled by the pipeline after the run.
    summary: dict[str, Any] | None = None
    # Blocks (and their bytes) an interrupted run had written and this one verified and kept.
    reused_blocks: int = 0
    reused_bytes: int = 0
    # Busy seconds per stage (they overlap, so their sum can exceed the wall time).
    timings: dict[str, float] = field(default_factory=dict)
    # The device pipeline (engine/device_pipeline.py): device slots, budget and peak (torch's
    # allocator on CUDA, the fake's ledger on cpu-staged), small units packed (and into how
    # many packs), and the cpu-staged fake's order of stages: (stage, item, "start" | "end").
    device_slots: int = 0
    device_budget: int = 0
    device_peak_bytes: int = 0
    packed_units: int = 0
    packs: int = 0
    device_log: list[tuple[str, int, str]] = field(default_factory=list)

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
