"""The cache key of a multi-stage recipe's intermediate stage, one function for ``merge`` (which
folder to write or reuse) and ``plan`` (whether the stage is cached), so the two cannot disagree.

The key is the fingerprint a ``--resume`` checks (resume.plan_fingerprint) of the stage's plan,
made with the run's own options: those that change the output's bytes reach it (the random
seed and numerics through the plan, ``allow_pickle`` through the inputs it opens, the shard
size, device and kernels directly); the others (memory budgets, threads, progress, fsync,
executor, hash_inputs, overwrite) do not, so changing them reuses the cached folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from weightsmith.defaults import DEFAULT_SHARD_SIZE
from weightsmith.engine.device import resolve_device
from weightsmith.engine.device_choice import DeviceChoice
from weightsmith.engine.tasks import MergePlan
from weightsmith.errors import RecipeError
from weightsmith.resume import plan_fingerprint
from weightsmith.units import parse_size

# ``pipeline.plan_merge``'s options, taken from the run's (``merge``'s) options.
PLAN_OPTIONS = ("memory_budget", "random_seed", "allow_pickle", "numerics")


def plan_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options of a merge that planning a stage takes."""
    return {k: options[k] for k in PLAN_OPTIONS if k in options}


def stage_key(plan: MergePlan, options: dict[str, Any]) -> str:
    """The key of a stage planned as ``plan``, merged with ``merge``'s ``options``."""
    try:
        shard_bytes = parse_size(options.get("out_shard_size", DEFAULT_SHARD_SIZE))
    except ValueError as e:
        raise RecipeError(f"out shard size: {e}") from None
    device = resolve_device(options.get("device", "cpu"))  # `auto`: what a merge here would use
    choice = DeviceChoice(device, options.get("kernels", "torch"))  # (the budget changes no byte)
    return str(plan_fingerprint(plan, shard_bytes, choice)["fingerprint"])


def stage_folder(cache: Path, name: str, plan: MergePlan, options: dict[str, Any]) -> Path:
    """The intermediate's folder in the stage cache: the stage's name and its key."""
    return cache / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-{stage_key(plan, options)[:16]}"
