"""Which command builds a missing example input: the ``input-commands.txt`` convention.

A folder of recipes (merges/ in this repository) may hold ``input-commands.txt``: lines of
``PATH-PREFIX COMMAND``, the prefix relative to that folder. When a model is missing,
``build_hint`` looks for the file in the parent folders of each path tried and returns the
command of the longest prefix that matches, so the error can say how to build the input.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

FILE_NAME = "input-commands.txt"


def read_commands(path: Path) -> dict[str, str]:
    """``{prefix: command}`` from an input-commands.txt; ``#`` starts a comment line."""
    commands: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prefix, _, command = line.strip().partition(" ")
        if command.strip():
            commands[prefix] = command.strip()
    return commands


def build_hint(paths: Iterable[Path]) -> str | None:
    """The command that builds the first of ``paths`` an input-commands.txt covers, if any."""
    for path in paths:
        path = Path(path).absolute()
        for folder in path.parents:
            listing = folder / FILE_NAME
            if not listing.is_file():
                continue
            try:
                commands = read_commands(listing)
            except (OSError, UnicodeDecodeError):
                break  # an unreadable hint must never hide the real error
            relative = path.relative_to(folder).as_posix()
            matches = [p for p in commands if relative.startswith(p)]
            if matches:
                return commands[max(matches, key=len)]
            break  # the nearest listing decides; a farther one describes other folders
    return None


def local_look_alikes(ref: str, folders: Iterable[Path]) -> list[Path]:
    """Existing paths one folder below any of ``folders`` that end in ``ref``: where a relative
    path was probably meant to be read from (``inputs/minilm-base`` typed at the repository
    root, where the examples' inputs are ``merges/inputs/minilm-base``)."""
    found: list[Path] = []
    for folder in folders:
        try:
            children = sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
        found += [child / ref for child in children if (child / ref).exists()]
    return found[:3]


def looks_local(ref: str, folders: Iterable[Path]) -> bool:
    """A ref like ``inputs/minilm-base`` whose first folder exists here is a local path, not a
    Hub id (``org/name``), even though it has the shape of one."""
    first = Path(ref).parts[0] if Path(ref).parts else ""
    return bool(first) and any((Path(folder) / first).is_dir() for folder in folders)
