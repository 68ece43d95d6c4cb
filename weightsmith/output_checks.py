"""Checks on OUT made before any work: it must not overlap an input, and its folder must be
writable. ``--overwrite`` removes the old OUT, so an OUT that is, holds or sits inside an input
would delete or alter that input. ``check_before_work`` runs them with the memory-budget check."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from weightsmith.engine.plan import MergePlan
from weightsmith.engine.tasks import budget_that_fits, over_budget
from weightsmith.errors import MergeError, OutputError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.tokenizer_output import tokenizer_root
from weightsmith.units import format_size


@dataclass(frozen=True)
class Protected:
    """An input path OUT must keep clear of. A folder (a model folder, a Hub snapshot) may be
    neither OUT, inside OUT, nor contain OUT; a file may be neither OUT nor inside OUT (writing
    beside a single ``.safetensors`` file or a recipe is fine)."""

    label: str  # what it is, for the message: "input model 'org/x'", "recipe file", ...
    path: Path  # resolved (symlinks followed)
    folder: bool


def protect(label: str, path: str | os.PathLike[str], folder: bool) -> Protected:
    return Protected(label, Path(path).expanduser().resolve(), folder)


def check_clear_of_inputs(out: str | os.PathLike[str], inputs: list[Protected], overwrite: bool) -> None:
    """Refuse an OUT that is, contains or (for folders) lies inside any input, symlinks resolved."""
    target = Path(out).expanduser().resolve()
    deleted = [p for p in inputs if p.path == target or target in p.path.parents]
    if deleted:
        shown = "; ".join(f"{p.label} at {p.path}" for p in _unique(deleted)[:5])
        action = "--overwrite would delete " if overwrite else ""
        raise OutputError(
            f"OUT {target} is or contains an input ({action}{shown}); choose an OUT outside "
            "every input folder"
        )
    inside = [p for p in inputs if p.folder and p.path in target.parents]
    if inside:
        p = inside[0]
        raise OutputError(
            f"OUT {target} is inside the {p.label} folder {p.path}: writing the output there would "
            "change an input (and mix its files with the output's); choose an OUT outside it"
        )


def check_parent_writable(out: str | os.PathLike[str]) -> None:
    """The nearest existing folder above OUT must let us create folders in it."""
    target = Path(out).expanduser().absolute()
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot create OUT {target}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(_permission_message(target, folder))


def permission_error(out: str | os.PathLike[str], error: OSError) -> OutputError | None:
    """The message for a permission or read-only-filesystem error while creating OUT."""
    if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        return None
    # The permission missing is that of the folder the failed path was to be created in.
    folder = Path(error.filename).parent if error.filename else Path(out).absolute().parent
    return OutputError(_permission_message(Path(out).absolute(), folder, error.strerror))


def _permission_message(target: Path, folder: Path, reason: str | None = None) -> str:
    why = reason or "permission denied or read-only filesystem"
    return (
        f"cannot create OUT {target}: no write permission in {folder} ({why}); choose an OUT in "
        "a folder you can write to, or make that folder writable (chmod u+w)"
    )


def _unique(items: list[Protected]) -> list[Protected]:
    seen: dict[Path, Protected] = {}
    for p in items:
        seen.setdefault(p.path, p)
    return list(seen.values())


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
        out += checkpoint_paths(label, ckpt, recipe.search_dirs)
    source = recipe.tokenizer_source
    if source not in (None, "base", "union") and not any(c.ref == source for c in plan.checkpoints):
        out.append(protect(f"tokenizer source {source!r}", tokenizer_root(plan), folder=True))
    if recipe.source is not None:
        out.append(protect("recipe file", recipe.source, folder=False))
    for block in ("evaluation", "calibration"):
        data = (getattr(recipe, block) or {}).get("data")
        if isinstance(data, str):
            out.append(protect(f"{block} data", recipe.data_path(data), folder=False))
    return out


def checkpoint_paths(label: str, ckpt: Checkpoint, search_dirs: tuple[Path, ...] = ()) -> list[Protected]:
    """The paths of one input checkpoint OUT must keep clear of (also extract-lora's and
    out_format: lora's inputs)."""
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
