"""Checks on OUT made before any work: it must not overlap an input, and its folder must be
writable. ``--overwrite`` removes the old OUT, so an OUT that is, holds or sits inside an input
would delete or alter that input."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from weightsmith.errors import OutputError


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
            f"OUT {target} is inside the {p.label} folder {p.path}: writing the merge there would "
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
