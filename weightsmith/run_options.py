"""The options of one merge run, as one frozen value.

``weightsmith.merge(...)``, ``run_plan(...)`` and the CLI take these as keyword arguments (users
call them); each builds a ``RunOptions`` once and hands that one object down, so no option is
passed positionally through several layers (where a swapped pair once went unnoticed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weightsmith.defaults import DEFAULT_MEMORY_BUDGET, DEFAULT_SHARD_SIZE, EXECUTORS
from weightsmith.devices import device_choice
from weightsmith.engine.device_choice import DeviceChoice
from weightsmith.errors import RecipeError


@dataclass(frozen=True)
class RunOptions:
    """How a merge is planned and run (what it merges is the recipe's business).

    The first five fields are planning's (``plan_merge``); a plan already built ignores them."""

    memory_budget: str | int = DEFAULT_MEMORY_BUDGET
    random_seed: int | None = None
    allow_pickle: bool = False
    strict: bool = False
    numerics: str | None = None
    out_shard_size: str | int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    device: str = "cpu"
    threads: int | None = None
    progress: bool = False
    fsync: bool = True
    resume: bool = False
    kernels: str = "torch"
    device_memory_budget: str | int | None = None
    executor: str = "local"
    ray_address: str | None = None
    # False: Ray workers never see OUT; each streams its shard back to the driver
    # (engine/ray_stream.py, docs/distributed.md "Without shared storage").
    ray_shared_fs: bool = True
    hash_inputs: bool = False
    # (file name, text) written into OUT beside the merge's own files before it is committed,
    # so a workflow's report (graft_report.json) appears with the output or not at all.
    extra_files: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise RecipeError(f"executor {self.executor!r}: choose one of {', '.join(EXECUTORS)}")
        if not self.ray_shared_fs and self.executor != "ray":
            raise RecipeError("ray_shared_fs=False (--ray-no-shared-fs) applies to --executor ray only; "
                              "add --executor ray or drop the option")

    def device_choice(self) -> DeviceChoice:
        """``device``, ``kernels`` and ``device_memory_budget`` as the one value the engine takes:
        checked (``auto`` resolved, the budget parsed to bytes; RecipeError otherwise). The three
        stay fields here because they are the user's options, as given (``auto``, ``"2GB"``)."""
        return device_choice(self.device, self.kernels, self.device_memory_budget)

    def planning(self) -> dict[str, Any]:
        """The keyword arguments of ``plan_merge`` (strict aside: it applies to the first plan only)."""
        return {
            "memory_budget": self.memory_budget,
            "random_seed": self.random_seed,
            "allow_pickle": self.allow_pickle,
            "numerics": self.numerics,
        }
