"""What lets an interrupted merge be resumed: the fingerprint of its plan (kept in the output's
journal) and the command that resumes it."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from weightsmith.defaults import DEFAULT_SHARD_SIZE
from weightsmith.engine.device_choice import DeviceChoice
from weightsmith.engine.plan import MergePlan
from weightsmith.io.fingerprints import json_digest
from weightsmith.run_options import RunOptions
from weightsmith.version import __version__


def resume_command_for(recipe: Any, out: str | Path, options: RunOptions) -> str:
    """The command that resumes this merge, for the note about an interrupted one."""
    api = f"weightsmith.merge(<this recipe>, {str(out)!r}, ..., resume=True)"
    try:
        if not isinstance(recipe, (str, Path)) or "\n" in str(recipe) or not Path(recipe).is_file():
            return api
    except OSError:  # a one-line YAML string too long for a file name
        return api
    o = options
    words = ["weightsmith", "merge", str(recipe), str(out)]
    if str(o.out_shard_size) != DEFAULT_SHARD_SIZE:
        words += ["--out-shard-size", str(o.out_shard_size)]
    if o.random_seed is not None:
        words += ["--random-seed", str(o.random_seed)]
    if o.device != "cpu":
        words += ["--device", o.device]
    if o.kernels != "torch":
        words += ["--kernels", o.kernels]
    if o.device_memory_budget is not None:
        words += ["--device-memory-budget", str(o.device_memory_budget)]
    if o.allow_pickle:
        words.append("--allow-pickle")
    if o.numerics is not None:
        words += ["--numerics", o.numerics]
    if o.executor != "local":
        words += ["--executor", o.executor]
    if o.ray_address is not None:
        words += ["--ray-address", o.ray_address]
    if not o.ray_shared_fs:
        words.append("--ray-no-shared-fs")
    if o.overwrite:
        words.append("--overwrite")
    return shlex.join([*words, "--resume"])


def byte_route(choice: DeviceChoice) -> dict[str, str | None]:
    """The part of ``--device`` / ``--kernels`` that decides the output's bytes: the CPU and the
    ``cpu-staged`` fake write the same bytes (tests/test_device_pipeline.py), whichever GPU is
    used does not matter, and the kernels matter only on a GPU (on the CPU the operators pick
    the CPU kernels whatever the choice; ops/kernel_choice.py). The device memory budget does
    not matter at all."""
    if not choice.on_gpu:
        return {"device": "cpu", "kernels": None}
    return {"device": choice.device.split(":")[0], "kernels": choice.kernels}


def plan_fingerprint(plan: MergePlan, shard_bytes: int, device_choice: DeviceChoice) -> dict[str, Any]:
    """What must not change for an interrupted merge to be resumed (and what names a
    multi-stage recipe's cached intermediate, stage_keys.py): the plan (recipe, method, every
    task with its parameters, dtypes and seed), the inputs' shard fingerprints, and the options
    that change the output's bytes (shard size; device and kernels as ``byte_route``). The
    memory budget is not among them: a resumed run may use another one (it only re-splits
    rows, and re-does the blocks whose span moved); nor are threads, progress, fsync,
    the executor (Ray writes the same bytes) or the device memory budget."""

    parts = {
        "plan": json_digest(
            {
                "recipe": plan.recipe.to_yaml(),
                "method": plan.method.name,
                "compute_dtype": str(plan.compute_dtype),
                "numerics": plan.recipe.numerics,
                "tasks": [repr(t) for t in plan.tasks],
            }
        ),
        "inputs": json_digest([c.provenance() for c in plan.checkpoints]),
        "options": {
            "out_shard_size": shard_bytes,
            **byte_route(device_choice),
            "weightsmith_version": __version__,
        },
    }
    return {"fingerprint": json_digest(parts), "parts": parts}
