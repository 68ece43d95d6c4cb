"""The merge job: recipe -> plan -> streamed execution -> complete output folder, atomically."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from weightsmith.data_steps import check_data_blocks, run_data_steps
from weightsmith.defaults import DEFAULT_MEMORY_BUDGET, DEFAULT_SHARD_SIZE
from weightsmith.devices import check_device
from weightsmith.engine.device_choice import DeviceChoice
from weightsmith.engine.executor import RunStats, execute
from weightsmith.engine.modules import build_sliced_plan, is_sliced
from weightsmith.engine.plan import MergePlan, build_plan
from weightsmith.engine.plan_context import CheckpointOpener, open_checkpoint
from weightsmith.engine.summary import build_summary
from weightsmith.engine.vocab_rows import apply_alignment
from weightsmith.errors import OutputError, RecipeError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.io.output_dir import OutputDir
from weightsmith.io.writer import ShardWriter
from weightsmith.notices import collecting
from weightsmith.ops import fused
from weightsmith.ops.registry import MergeMethod
from weightsmith.output_checks import check_before_work, permission_error
from weightsmith.plan_inputs import normalize_models, open_inputs, with_numerics
from weightsmith.progress import progress as progress_of
from weightsmith.recipe import Recipe, load_recipe
from weightsmith.resume import plan_fingerprint, resume_command_for
from weightsmith.run_options import RunOptions
from weightsmith.side_files import write_side_files
from weightsmith.tokenizer_output import plan_vocabulary
from weightsmith.units import format_size, parse_size
from weightsmith.version import __version__


@dataclass
class MergeResult:
    out: Path
    plan: MergePlan
    stats: RunStats
    seconds: float


def plan_merge(
    recipe: str | Path | dict[str, Any] | Recipe,
    *,
    memory_budget: str | int = DEFAULT_MEMORY_BUDGET,
    random_seed: int | None = None,
    allow_pickle: bool = False,
    strict: bool = False,
    numerics: str | None = None,
) -> MergePlan:
    """Validate a recipe and build its plan from headers alone (the dry run).

    What mergekit silently ignores (unknown fields, parameters the method does not take) gives
    one warning each, in ``plan.warnings``; ``strict`` makes them errors. ``numerics`` overrides
    the recipe's ``numerics:`` ("weightsmith" or "mergekit"; docs/mergekit.md, "Numerics")."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, strict=strict)
    elif strict and not recipe.strict:
        if recipe.warnings:
            raise RecipeError(f"{recipe.warnings[0]} (strict: mergekit would ignore it; remove or fix it)")
        recipe.strict = True
    recipe = with_numerics(recipe, numerics)
    recipe = normalize_models(recipe)
    checkpoints = open_inputs(recipe, allow_pickle)
    return plan_checkpoints(recipe, checkpoints, memory_budget=memory_budget, random_seed=random_seed)


def plan_checkpoints(
    recipe: Recipe,
    checkpoints: list[Checkpoint],
    *,
    memory_budget: str | int = DEFAULT_MEMORY_BUDGET,
    random_seed: int | None = None,
    method: MergeMethod | None = None,
    open_aux: CheckpointOpener = open_checkpoint,
) -> MergePlan:
    """The one way a merge is planned: ``weightsmith merge``/``plan``, ``merge()`` and the lazy
    API's ``save`` all come through here (``method`` stands in for the recipe's, see build_plan;
    ``open_aux`` opens the checkpoints parameters name: a search reuses its own, per candidate)."""
    vocab = plan_vocabulary(recipe, checkpoints)
    if is_sliced(recipe):
        plan = build_sliced_plan(
            recipe, checkpoints, memory_budget=_size(memory_budget, "memory budget"),
            random_seed=random_seed, method=method,
        )
        if vocab is not None:
            apply_alignment(plan, vocab, checkpoints)
    else:
        plan = build_plan(
            recipe, checkpoints, memory_budget=_size(memory_budget, "memory budget"),
            random_seed=random_seed, method=method, vocab=vocab, open_aux=open_aux,
        )
    # evaluation:/calibration: blocks are checked here, before any model runs.
    check_data_blocks(plan)
    return plan


def merge(
    recipe: str | Path | dict[str, Any] | Recipe,
    out: str | Path,
    *,
    memory_budget: str | int = DEFAULT_MEMORY_BUDGET,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    random_seed: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    allow_pickle: bool = False,
    progress: bool = False,
    fsync: bool = True,
    resume: bool = False,
    strict: bool = False,
    numerics: str | None = None,
    kernels: str = "torch",
    device_memory_budget: str | int | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    ray_shared_fs: bool = True,
    hash_inputs: bool = False,
    extra_files: Mapping[str, str] | None = None,
) -> MergeResult:
    """Merge the models a recipe names into ``out`` (a new folder; see ``overwrite``).

    ``recipe`` is a YAML path, a YAML string or a dict in mergekit's format. ``resume``
    continues a merge of the same plan (recipe, inputs, shard size, device) into the same
    ``out`` that was killed before it finished, reusing the blocks it wrote once re-checked;
    the output is byte for byte what an uninterrupted run writes. ``strict``: see plan_merge.
    ``numerics="mergekit"`` reproduces mergekit 0.1.5's arithmetic (docs/mergekit.md, "Numerics").
    ``hash_inputs`` records the sha256 of every local input shard (a full read of each)
    instead of a sampled fingerprint. ``extra_files`` (name -> text): more files for ``out``,
    written before it is renamed into place (a workflow's own report).
    (``weightsmith.merge`` also runs multi-stage recipes: weightsmith/stages.py.)
    ``executor="ray"`` runs one task per output shard on a Ray cluster (``ray_address``, else a
    local one), docs/distributed.md: the same bytes; ``ray_shared_fs=False`` when the workers
    cannot see ``out``: each streams its shard back to this process.
    """
    options = RunOptions(
        memory_budget=memory_budget, random_seed=random_seed, allow_pickle=allow_pickle, strict=strict,
        numerics=numerics, out_shard_size=out_shard_size, overwrite=overwrite, device=device,
        threads=threads, progress=progress, fsync=fsync, resume=resume, kernels=kernels,
        device_memory_budget=device_memory_budget, executor=executor, ray_address=ray_address,
        ray_shared_fs=ray_shared_fs, hash_inputs=hash_inputs,
        extra_files=tuple((extra_files or {}).items()),
    )
    with collecting():  # a warning repeated by a re-plan (greedy soups) is printed once
        return merge_with(recipe, out, options)


def merge_with(
    recipe: str | Path | dict[str, Any] | Recipe, out: str | Path, options: RunOptions
) -> MergeResult:
    """``merge`` with its options as one ``RunOptions``."""
    started = time.perf_counter()
    options = replace(options, device=check_device(options.device, options.kernels))
    plan = plan_merge(recipe, strict=options.strict, **options.planning())
    check_before_work(plan, out, options.overwrite)  # before data steps, which may run models for minutes

    def replan(changed: Recipe) -> MergePlan:
        return plan_merge(changed, **options.planning())

    # Greedy soups choose their ingredients and Antidote measures feature norms on data first.
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if options.progress else None
    plan = run_data_steps(plan, replan, log)
    return run_plan_with(plan, out, options, started=started,
                         resume_command=resume_command_for(recipe, out, options))


def run_plan(
    plan: MergePlan,
    out: str | Path,
    *,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = False,
    fsync: bool = True,
    started: float | None = None,
    resume: bool = False,
    resume_command: str | None = None,
    kernels: str = "torch",
    device_memory_budget: str | int | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    ray_shared_fs: bool = True,
    hash_inputs: bool = False,
) -> MergeResult:
    """Execute a plan into a new output folder, atomically (``resume``, ``executor``,
    ``ray_shared_fs``, ``hash_inputs``: see ``merge``).

    ``device``: cpu, cuda[:N], auto (CUDA when present) or cpu-staged (the device pipeline on
    the CPU, for tests); ``kernels`` (torch or cupy) and ``device_memory_budget`` apply to a
    device (engine/device_pipeline.py), on each Ray worker with ``executor="ray"``."""
    options = RunOptions(
        memory_budget=plan.memory_budget, out_shard_size=out_shard_size, overwrite=overwrite, device=device,
        threads=threads, progress=progress, fsync=fsync, resume=resume, kernels=kernels,
        device_memory_budget=device_memory_budget, executor=executor, ray_address=ray_address,
        ray_shared_fs=ray_shared_fs, hash_inputs=hash_inputs,
    )
    return run_plan_with(plan, out, options, started=started, resume_command=resume_command)


def run_plan_with(
    plan: MergePlan,
    out: str | Path,
    options: RunOptions,
    *,
    started: float | None = None,
    resume_command: str | None = None,
) -> MergeResult:
    """``run_plan`` with its options as one ``RunOptions``."""
    started = started if started is not None else time.perf_counter()
    check_before_work(plan, out, options.overwrite)
    # torch's own default (one thread per core) measured best on a quiet 2-core machine (ties
    # 36 s vs 44 s with one thread, linear 6.1 s vs 8.3 s); on a machine busy with other work,
    # `--threads 1` avoids spinning at every parallel region. The caller's setting is restored
    # afterwards (merge() is also called from notebooks).
    previous = torch.get_num_threads()
    previous_kernel_threads = None
    if options.threads:
        torch.set_num_threads(options.threads)
        previous_kernel_threads = fused.set_threads(options.threads)  # the fused kernels' pool too
    try:
        device_choice = options.device_choice()  # checked before the output folder exists
        run = execute
        if options.executor == "ray":
            from weightsmith.engine.ray_executor import execute_on_ray

            run = functools.partial(execute_on_ray, address=options.ray_address,
                                    shared_fs=options.ray_shared_fs)
        return _run_plan(plan, out, options, device_choice, started, resume_command, run)
    finally:
        torch.set_num_threads(previous)
        if previous_kernel_threads is not None:
            fused.set_threads(previous_kernel_threads)


def _run_plan(
    plan: MergePlan,
    out: str | Path,
    options: RunOptions,
    device_choice: DeviceChoice,
    started: float,
    resume_command: str | None,
    run: Callable[..., RunStats],
) -> MergeResult:
    shard_bytes = _size(options.out_shard_size, "out shard size")
    try:
        output = OutputDir(
            out,
            overwrite=options.overwrite,
            journal_header=plan_fingerprint(plan, shard_bytes, device_choice),
            resume=options.resume,
            resume_command=resume_command,
            durable=options.fsync,
        )
    except OSError as e:
        message = permission_error(out, e)
        if message is None:
            raise
        raise message from None
    with output as folder:
        layout = [(t.name, t.out_dtype, t.shape) for t in plan.tasks]
        reserve_started = time.perf_counter()
        try:
            writer = ShardWriter(
                folder.tmp,
                layout,
                shard_bytes,
                {"weightsmith_version": __version__},
                out=folder.out,
                resume=folder.resumed,
            )
        except OutputError as e:
            stale = sum(lo.nbytes for lo in folder.leftovers if lo.path != folder.tmp)
            if not stale or "disk full" not in str(e):
                raise
            raise OutputError(
                f"{e} Interrupted merges of {folder.out} hold {format_size(stale)} of it in the "
                "temporary folders named above."
            ) from e
        reserve_seconds = time.perf_counter() - reserve_started
        try:
            reused = {}
            if folder.resumed and folder.journal:
                blocks = {(u.task.name, u.rows) for u in plan.units}
                reused = writer.reuse(folder.journal.entries, blocks)
            if folder.resumed:
                print(
                    f"resume: {len(reused)} written blocks check out and are kept; computing the rest",
                    file=sys.stderr,
                    flush=True,
                )
            progress = options.progress
            bar = progress_of(plan.bytes_to_write, f"merge ({plan.method.name})", "B", enabled=progress,
                              unit_scale=True)
            stats = run(
                plan,
                writer,
                device_choice=device_choice,
                progress=bar.update if progress else None,
                journal=folder.journal,
                reused=reused,
            )
            bar.close()
            finish_started = time.perf_counter()
            index = writer.finish(fsync=options.fsync)
            stats.add_time("reserve", reserve_seconds)
            stats.add_time("finish", time.perf_counter() - finish_started)
        finally:
            writer.close()
        index["metadata"]["weightsmith_version"] = __version__
        folder.write_json("model.safetensors.index.json", index)
        stats.summary = build_summary(plan, stats)
        write_side_files(plan, folder, stats, time.perf_counter() - started, options.hash_inputs)
        for name, text in options.extra_files:
            folder.write_text(name, text)
        path = folder.commit()
    return MergeResult(path, plan, stats, time.perf_counter() - started)


def _size(value: str | int, what: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise RecipeError(f"{what}: {e}") from None
