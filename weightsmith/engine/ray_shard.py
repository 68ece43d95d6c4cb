"""What a Ray task runs for one output shard: the local executor over the shard's sub-plan,
writing through a ``ShardWriter`` onto shards another process laid out.

Shared by both ways a shard reaches the output: written in place on a shared filesystem
(``merge_shard``, engine/ray_executor.py) or written to a node-local file and streamed back
to the driver (engine/ray_stream.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from weightsmith.engine.device_choice import DeviceChoice
from weightsmith.engine.executor import UnitKey, execute
from weightsmith.engine.partition import sub_plan
from weightsmith.engine.run_stats import RunStats
from weightsmith.engine.tasks import MergePlan
from weightsmith.io.journal import Entry
from weightsmith.io.writer import ShardWriter

# Test-only: a worker that finds this file removes it and exits right after writing its first
# block, as a killed node would; Ray's retry must then produce the same output.
DIE_ONCE_ENV = "WEIGHTSMITH_TEST_RAY_DIE_ONCE"

ShardResult = tuple[RunStats, list[Entry], dict[str, int]]


class _Recorder:
    """Stands in for the journal on a worker: keeps the entries for the driver to journal."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def record(self, entry: Entry) -> None:
        self.entries.append(entry)
        die_if_marked(DIE_ONCE_ENV)


def die_if_marked(variable: str) -> None:
    """Test-only: exit at once, as a killed node would, if the marker file ``variable`` names
    exists (removing it first, so the retry lives)."""
    marker = os.environ.get(variable)
    if marker:
        try:
            os.remove(marker)
        except FileNotFoundError:
            return
        os._exit(1)


def run_shard(
    plan: MergePlan,
    indices: list[int],
    writer: ShardWriter,
    *,
    device_choice: DeviceChoice,
    statistics: tuple[Any, int, int] | None,
    reused: dict[UnitKey, Entry],
) -> ShardResult:
    """The local executor over one shard's units, into ``writer`` (closed after)."""
    recorder = _Recorder()
    try:
        stats = execute(
            sub_plan(plan, indices), writer, device_choice=device_choice, journal=recorder,  # type: ignore[arg-type]
            reused=reused, statistics=statistics,
        )
        for fd in writer.fds:
            os.fsync(fd)
    finally:
        writer.close()
    stats.context = None  # the driver has it (model-wide) or does not need it (per tensor)
    return stats, recorder.entries, writer.written


def merge_shard(
    plan: MergePlan,
    indices: list[int],
    folder: str,
    names: list[str],
    slots: dict[str, Any],
    device_choice: DeviceChoice,
    statistics: tuple[Any, int, int] | None,
    reused: dict[UnitKey, Entry],
) -> ShardResult:
    """One shard's work, on a worker that sees the output folder: blocks ``pwrite``n in place."""
    writer = ShardWriter.attach(Path(folder), names, slots)
    return run_shard(plan, indices, writer, device_choice=device_choice, statistics=statistics, reused=reused)
