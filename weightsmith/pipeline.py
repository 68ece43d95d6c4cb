"""The merge job: recipe -> plan -> streamed execution -> complete output folder, atomically."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.data_steps import check_data_blocks, run_data_steps
from weightsmith.devices import check_device
from weightsmith.engine.executor import RunStats, execute
from weightsmith.engine.modules import build_sliced_plan, is_sliced
from weightsmith.engine.plan import MergePlan, build_plan
from weightsmith.engine.summary import build_summary
from weightsmith.engine.tasks import budget_that_fits, over_budget
from weightsmith.engine.vocab_rows import apply_alignment
from weightsmith.errors import MergeError, OutputError, RecipeError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.io.model_card import base_license, render_card_from_report
from weightsmith.io.output_dir import OutputDir
from weightsmith.io.safetensors_format import DTYPE_NAMES
from weightsmith.io.writer import ShardWriter
from weightsmith.notices import collecting
from weightsmith.ops import fused
from weightsmith.ops.registry import MergeMethod, get_method
from weightsmith.output_checks import (
    Protected,
    check_clear_of_inputs,
    check_parent_writable,
    permission_error,
    protect,
)
from weightsmith.progress import Progress
from weightsmith.recipe import NUMERICS, Recipe, load_recipe
from weightsmith.tokenizer_output import plan_vocabulary, write_tokenizer
from weightsmith.units import format_size, parse_size
from weightsmith.version import __version__

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Small files that describe how to use the model rather than its weights.
TAG_ALONG_FILES = (
    "generation_config.json",
    "preprocessor_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)

DEFAULT_MEMORY_BUDGET = "1.25GB"
DEFAULT_SHARD_SIZE = "5GB"
# Where the plan runs: this process (engine/executor.py) or a Ray cluster (engine/ray_executor.py).
EXECUTORS = ("local", "ray")


@dataclass
class MergeResult:
    out: Path
    plan: MergePlan
    stats: RunStats
    seconds: float


def open_inputs(recipe: Recipe, allow_pickle: bool = False) -> list[Checkpoint]:
    """Open the base (if any) then every model, headers only."""
    refs = []
    if recipe.base_model is not None:
        refs.append(recipe.base_model)
    refs += [m.ref for m in recipe.models]
    return [Checkpoint.open(r, allow_pickle=allow_pickle, search_dirs=recipe.search_dirs) for r in refs]


def normalize_models(recipe: Recipe) -> Recipe:
    """A base listed again among the models adds a zero task vector: drop it (as mergekit).
    (A sliced recipe's models are only the inputs to open: engine/slices.py does this per slice.)"""
    if is_sliced(recipe):
        return recipe
    try:
        method = get_method(recipe.merge_method)
    except KeyError as e:
        raise RecipeError(str(e.args[0])) from None
    if recipe.base_model is not None and method.base != "unused":
        recipe.models = [m for m in recipe.models if m.ref != recipe.base_model]
        if not recipe.models:
            raise RecipeError("`models` lists only the base model; add the fine-tuned models")
    return recipe


def with_numerics(recipe: Recipe, numerics: str | None) -> Recipe:
    """The recipe with ``numerics`` (from the command line or the API) in place of its own."""
    if numerics is None or numerics == recipe.numerics:
        return recipe
    if numerics not in NUMERICS:
        raise RecipeError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
    return dataclasses.replace(recipe, numerics=numerics)


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
) -> MergePlan:
    """The one way a merge is planned: ``weightsmith merge``/``plan``, ``merge()`` and the lazy
    API's ``save`` all come through here (``method`` stands in for the recipe's, see build_plan)."""
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
            random_seed=random_seed, method=method, vocab=vocab,
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
    hash_inputs: bool = False,
) -> MergeResult:
    """Merge the models a recipe names into ``out`` (a new folder; see ``overwrite``).

    ``recipe`` is a YAML path, a YAML string or a dict in mergekit's format. ``resume``
    continues a merge of the same plan (recipe, inputs, shard size, device) into the same
    ``out`` that was killed before it finished, reusing the blocks it wrote once re-checked;
    the output is byte for byte what an uninterrupted run writes. ``strict``: see plan_merge.
    ``numerics="mergekit"`` reproduces mergekit 0.1.5's arithmetic (docs/mergekit.md, "Numerics").
    ``hash_inputs`` records the sha256 of every local input shard (a full read of each)
    instead of a sampled fingerprint.
    (``weightsmith.merge`` also runs multi-stage recipes: weightsmith/stages.py.)
    ``executor="ray"`` runs one task per output shard on a Ray cluster (``ray_address``, else a
    local one), docs/distributed.md: the same bytes.
    """
    with collecting():  # a warning repeated by a re-plan (greedy soups) is printed once
        return _merge(
            recipe, out, memory_budget, out_shard_size, overwrite, random_seed, device, threads,
            allow_pickle, progress, fsync, resume, strict, numerics, kernels, device_memory_budget,
            executor, ray_address,
            hash_inputs,
        )


def _merge(
    recipe: str | Path | dict[str, Any] | Recipe,
    out: str | Path,
    memory_budget: str | int,
    out_shard_size: str | int,
    overwrite: bool,
    random_seed: int | None,
    device: str,
    threads: int | None,
    allow_pickle: bool,
    progress: bool,
    fsync: bool,
    resume: bool,
    strict: bool,
    numerics: str | None = None,
    kernels: str = "torch",
    device_memory_budget: str | int | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    hash_inputs: bool = False,
) -> MergeResult:
    started = time.perf_counter()
    device = check_device(device, kernels)
    plan = plan_merge(
        recipe,
        memory_budget=memory_budget,
        random_seed=random_seed,
        allow_pickle=allow_pickle,
        strict=strict,
        numerics=numerics,
    )
    check_before_work(plan, out, overwrite)  # before data steps, which may run models for minutes

    def replan(changed: Recipe) -> MergePlan:
        return plan_merge(
            changed,
            memory_budget=memory_budget,
            random_seed=random_seed,
            allow_pickle=allow_pickle,
            numerics=numerics,
        )

    # Greedy soups choose their ingredients and Antidote measures feature norms on data first.
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else None
    plan = run_data_steps(plan, replan, log)
    return run_plan(
        plan,
        out,
        out_shard_size=out_shard_size,
        overwrite=overwrite,
        device=device,
        threads=threads,
        progress=progress,
        fsync=fsync,
        started=started,
        resume=resume,
        kernels=kernels,
        device_memory_budget=device_memory_budget,
        executor=executor,
        ray_address=ray_address,
        hash_inputs=hash_inputs,
        resume_command=_resume_command(
            recipe, out, out_shard_size, overwrite, random_seed, device, allow_pickle, numerics,
            kernels, device_memory_budget,
        ),
    )


def _resume_command(
    recipe: Any,
    out: str | Path,
    out_shard_size: str | int,
    overwrite: bool,
    random_seed: int | None,
    device: str,
    allow_pickle: bool,
    numerics: str | None = None,
    kernels: str = "torch",
    device_memory_budget: str | int | None = None,
) -> str:
    """The command that resumes this merge, for the note about an interrupted one."""
    api = f"weightsmith.merge(<this recipe>, {str(out)!r}, ..., resume=True)"
    try:
        if not isinstance(recipe, (str, Path)) or "\n" in str(recipe) or not Path(recipe).is_file():
            return api
    except OSError:  # a one-line YAML string too long for a file name
        return api
    words = ["weightsmith", "merge", str(recipe), str(out)]
    if str(out_shard_size) != DEFAULT_SHARD_SIZE:
        words += ["--out-shard-size", str(out_shard_size)]
    if random_seed is not None:
        words += ["--random-seed", str(random_seed)]
    if device != "cpu":
        words += ["--device", device]
    if kernels != "torch":
        words += ["--kernels", kernels]
    if device_memory_budget is not None:
        words += ["--device-memory-budget", str(device_memory_budget)]
    if allow_pickle:
        words.append("--allow-pickle")
    if numerics is not None:
        words += ["--numerics", numerics]
    if overwrite:
        words.append("--overwrite")
    return shlex.join([*words, "--resume"])


def plan_fingerprint(plan: MergePlan, shard_bytes: int, device: str) -> dict[str, Any]:
    """What must not change for an interrupted merge to be resumed: the plan (recipe, method,
    every task with its parameters, dtypes and seed), the inputs' shard fingerprints, and the
    options that change the output's bytes. The memory budget is not among them: a resumed run
    may use another one (it only re-splits rows, and re-does the blocks whose span moved)."""

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()

    parts = {
        "plan": digest(
            {
                "recipe": plan.recipe.to_yaml(),
                "method": plan.method.name,
                "compute_dtype": str(plan.compute_dtype),
                "numerics": plan.recipe.numerics,
                "tasks": [repr(t) for t in plan.tasks],
            }
        ),
        "inputs": digest([c.provenance() for c in plan.checkpoints]),
        "options": {
            "out_shard_size": shard_bytes,
            "device": device.split(":")[0],  # which GPU does not change the bytes
            "weightsmith_version": __version__,
        },
    }
    return {"fingerprint": digest(parts), "parts": parts}


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
    hash_inputs: bool = False,
) -> MergeResult:
    """Execute a plan into a new output folder, atomically (``resume``, ``executor``,
    ``hash_inputs``: see ``merge``).

    ``device``: cpu, cuda[:N], auto (CUDA when present) or cpu-staged (the device pipeline on
    the CPU, for tests); ``kernels`` (torch or cupy) and ``device_memory_budget`` apply to a
    device (engine/device_pipeline.py), on each Ray worker with ``executor="ray"``."""
    started = started if started is not None else time.perf_counter()
    if executor not in EXECUTORS:
        raise RecipeError(f"executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    check_before_work(plan, out, overwrite)
    # torch's own default (one thread per core) measured best on a quiet 2-core machine (ties
    # 36 s vs 44 s with one thread, linear 6.1 s vs 8.3 s); on a machine busy with other work,
    # `--threads 1` avoids spinning at every parallel region. The caller's setting is restored
    # afterwards (merge() is also called from notebooks).
    previous = torch.get_num_threads()
    previous_kernel_threads = None
    if threads:
        torch.set_num_threads(threads)
        previous_kernel_threads = fused.set_threads(threads)  # the fused kernels' pool too
    try:
        device = check_device(device, kernels)
        budget = (
            None if device_memory_budget is None else _size(device_memory_budget, "device memory budget")
        )
        run = execute
        if executor == "ray":
            from weightsmith.engine.ray_executor import execute_on_ray

            run = functools.partial(execute_on_ray, address=ray_address)
        return _run_plan(
            plan, out, out_shard_size, overwrite, device, progress, fsync, started, resume, resume_command,
            kernels, budget, run, hash_inputs,
        )
    finally:
        torch.set_num_threads(previous)
        if previous_kernel_threads is not None:
            fused.set_threads(previous_kernel_threads)


def _run_plan(
    plan: MergePlan,
    out: str | Path,
    out_shard_size: str | int,
    overwrite: bool,
    device: str,
    progress: bool,
    fsync: bool,
    started: float,
    resume: bool,
    resume_command: str | None,
    kernels: str = "torch",
    device_memory_budget: int | None = None,
    run: Callable[..., RunStats] = execute,
    hash_inputs: bool = False,
) -> MergeResult:
    shard_bytes = _size(out_shard_size, "out shard size")
    try:
        output = OutputDir(
            out,
            overwrite=overwrite,
            journal_header=plan_fingerprint(plan, shard_bytes, device),
            resume=resume,
            resume_command=resume_command,
            durable=fsync,
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
            bar = _progress_bar(plan, progress)
            stats = run(
                plan,
                writer,
                device=device,
                progress=bar.update if bar else None,
                journal=folder.journal,
                reused=reused,
                kernels=kernels,
                device_memory_budget=device_memory_budget,
            )
            if bar:
                bar.close()
            finish_started = time.perf_counter()
            index = writer.finish(fsync=fsync)
            stats.add_time("reserve", reserve_seconds)
            stats.add_time("finish", time.perf_counter() - finish_started)
        finally:
            writer.close()
        index["metadata"]["weightsmith_version"] = __version__
        folder.write_json("model.safetensors.index.json", index)
        stats.summary = build_summary(plan, stats)
        write_side_files(plan, folder, stats, time.perf_counter() - started, hash_inputs)
        path = folder.commit()
    return MergeResult(path, plan, stats, time.perf_counter() - started)


def check_before_work(plan: MergePlan, out: str | Path, overwrite: bool) -> None:
    """What can be known wrong before any tensor is read: OUT overlapping an input, an OUT
    folder we cannot write, a tensor the memory budget cannot hold. Every path that writes a
    merge (``merge``, ``run_plan``, the lazy API's ``save``) goes through here."""
    check_clear_of_inputs(out, protected_inputs(plan), overwrite)
    check_parent_writable(out)
    check_fits_budget(plan)


def protected_inputs(plan: MergePlan) -> list[Protected]:
    """Every path a merge reads: model folders (Hub snapshots included) or single files, each
    shard (symlinks resolved: Hub blobs), checkpoints that parameters name, the tokenizer
    source, the recipe file and data files."""
    recipe = plan.recipe
    out: list[Protected] = []
    n_inputs = (recipe.base_model is not None) + len(recipe.models)
    for i, ckpt in enumerate(plan.checkpoints):
        label = f"input model {ckpt.ref!r}" if i < n_inputs else f"checkpoint {ckpt.ref!r} a parameter names"
        out += _checkpoint_paths(label, ckpt, recipe.search_dirs)
    source = recipe.tokenizer_source
    if source not in (None, "base", "union") and not any(c.ref == source for c in plan.checkpoints):
        out.append(protect(f"tokenizer source {source!r}", _tokenizer_root(plan), folder=True))
    if recipe.source is not None:
        out.append(protect("recipe file", recipe.source, folder=False))
    for block in ("evaluation", "calibration"):
        data = (getattr(recipe, block) or {}).get("data")
        if isinstance(data, str):
            out.append(protect(f"{block} data", recipe.data_path(data), folder=False))
    return out


def _checkpoint_paths(label: str, ckpt: Checkpoint, search_dirs: tuple[Path, ...]) -> list[Protected]:
    ref = Path(ckpt.ref).expanduser()
    candidates = [ref, *(d / ref for d in search_dirs if not ref.is_absolute())]
    given = next((p for p in candidates if p.exists()), None)
    single = given is not None and given.is_file() and not given.name.endswith(".index.json")
    # A single .safetensors file is protected as a file: writing beside it is fine. Anything
    # else (a folder, an index, a Hub snapshot) is a model folder.
    paths = [protect(label, given, folder=False)] if single else [protect(label, ckpt.root, folder=True)]
    paths += [protect(label, ckpt.root / shard, folder=False) for shard in ckpt.shard_files]
    adapter = getattr(ckpt, "adapter", None)  # BASE+ADAPTER: the adapter folder is an input too
    if adapter is not None:
        paths.append(protect(f"{label} (its LoRA adapter)", adapter.root, folder=True))
    return paths


def check_fits_budget(plan: MergePlan) -> None:
    """A tensor the method cannot merge in row blocks gets a one-off buffer; when that takes
    the merge past the memory budget it would die mid-merge (or swap): refuse before any
    work, saying what it needs and the budget that runs it."""
    if not over_budget(plan):
        return
    fits = budget_that_fits(plan)
    task = max((t for t in plan.tasks if t.name in plan.oversize), key=lambda t: t.numel)
    others = f" (and {len(plan.oversize) - 1} more)" if len(plan.oversize) > 1 else ""
    raise MergeError(
        f"tensor {task.name!r} {list(task.shape)}{others}: `{plan.method.name}` with these "
        "parameters cannot merge it in row blocks, so the merge needs about "
        f"{plan.peak_estimate:,} bytes ({format_size(plan.peak_estimate)}) of tensor memory, over "
        f"the memory budget of {plan.memory_budget:,} bytes ({format_size(plan.memory_budget)}). "
        f"Pass --memory-budget {budget_option(fits)} (memory_budget= in Python) or more, or use "
        "a method or parameters that merge in row blocks (`weightsmith plan` shows them; e.g. "
        "linear, task_arithmetic, or ties with scope: model)"
    )


def budget_option(n: int) -> str:
    """A --memory-budget value at least ``n`` bytes, rounded up to whole KB or MB."""
    if n < 10**6:
        return f"{-(-n // 10**3)}KB"
    return f"{-(-n // 10**6)}MB"


def write_side_files(
    plan: MergePlan, folder: OutputDir, stats: RunStats, seconds: float, hash_inputs: bool = False
) -> None:
    """config.json, tokenizer, recipe, model card and merge report beside the shards."""
    recipe = plan.recipe
    ref = plan.checkpoints[plan.ref_index]
    if ref.config is not None:
        config = {**ref.config, **plan.config_updates}
        float_dtypes = [t.out_dtype for t in plan.tasks if t.kind == "merge"]
        if float_dtypes:
            name = str(max(set(float_dtypes), key=float_dtypes.count)).removeprefix("torch.")
            # transformers >= 4.56 reads `dtype`, earlier versions (which pyproject allows)
            # only `torch_dtype`: write both.
            config["torch_dtype"] = config["dtype"] = name
        rows = plan.out_vocab_rows
        if rows is not None and "vocab_size" in config:
            config["vocab_size"] = rows
        folder.write_json("config.json", config)
    write_tokenizer(recipe, plan.vocab, _tokenizer_root(plan), folder, TOKENIZER_FILES)
    for fname in TAG_ALONG_FILES:
        if (ref.root / fname).is_file():
            folder.copy_file(ref.root / fname)
    folder.write_text("weightsmith_recipe.yaml", recipe.to_yaml())
    inputs = [c.provenance(full_hash=hash_inputs) for c in plan.checkpoints]
    name = recipe.name or Path(folder.out).name
    # The license follows the base model (or, without one, the model the output's config follows).
    lic_src = plan.checkpoints[plan.base_index] if plan.base_index is not None else ref
    license_ = base_license(
        lic_src.root,
        lic_src.config,
        repo_id=lic_src.ref.partition("@")[0] if lic_src.revision else None,
        revision=lic_src.revision,
    )
    report = {
        "weightsmith_version": __version__,
        "name": name,
        "merge_method": plan.method.name,
        "method_summary": plan.method.summary,
        "paper": plan.method.paper,
        "base_model": recipe.base_model,
        "license": license_ or None,
        "inputs": inputs,
        "input_hashes": "sha256" if hash_inputs else "sampled_fingerprint",
        "random_seed": plan.random_seed,
        "key_mappings": [{"model": ref, "strip": strip, "add": add}
                         for ref, (strip, add) in plan.key_mappings.items()],
        "dropped_tensors": plan.dropped,
        "seconds": round(seconds, 3),
        "stage_seconds": {k: round(v, 3) for k, v in stats.timings.items()},
        "bytes_read": stats.bytes_read,
        "bytes_written": stats.bytes_written,
        **({"resumed": {"reused_blocks": stats.reused_blocks, "reused_bytes": stats.reused_bytes}}
           if stats.reused_blocks else {}),
        "tensors": len(plan.tasks),
        "per_tensor": stats.report,
        **({"summary": stats.summary} if stats.summary else {}),
        "dtypes": sorted({DTYPE_NAMES[t.out_dtype] for t in plan.tasks}),
    }
    folder.write_text("merge_report.json", json.dumps(report, indent=2) + "\n")
    folder.write_text("README.md", render_card_from_report(report, recipe.to_yaml(), name=name))


def _tokenizer_root(plan: MergePlan) -> Path:
    source = plan.recipe.tokenizer_source
    ref = plan.checkpoints[plan.ref_index]
    if source in (None, "base", "union"):
        return ref.root
    for ckpt in plan.checkpoints:
        if ckpt.ref == source:
            return ckpt.root
    return Checkpoint.open(source, search_dirs=plan.recipe.search_dirs).root


def _size(value: str | int, what: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise RecipeError(f"{what}: {e}") from None


def _progress_bar(plan: MergePlan, enabled: bool) -> Progress | None:
    if not enabled:
        return None
    from weightsmith.progress import progress

    return progress(plan.bytes_to_write, f"merge ({plan.method.name})", "B", unit_scale=True)
