"""Atomic output folders: OUT is assembled in a hidden temporary sibling and renamed into place
only when complete; any error, Ctrl-C or SIGTERM removes it, so a half-written output never
exists. A folder left by a process that died (SIGKILL, OOM killer, power loss) is found here
(``find_leftovers``) and reported or, with ``--resume``, continued. Disk errors name OUT and
the space needed and free."""

from __future__ import annotations

import errno
import glob
import json
import os
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith import finished_outputs
from weightsmith.errors import OutputError
from weightsmith.io import journal
from weightsmith.units import format_size


def _disk_error(
    e: OSError, path: Path, need: int | None = None, out: Path | None = None
) -> OutputError:
    """One message naming OUT (the temporary folder is gone by the time it is read)."""
    where = out or path
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        sizes = ""
        if need:
            sizes = f": the output needs {format_size(need)}"
            free = _free_bytes(where.parent)
            if free is not None:
                sizes += f", {format_size(free)} is free there"
        return OutputError(
            f"{where}: disk full while writing the output{sizes}; free space on "
            f"{where.parent} or choose another OUT. Nothing was left behind."
        )
    return OutputError(f"{where}: cannot write {path.name} ({e.strerror or e})")


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


TMP_MARK = ".weightsmith-tmp-"


@dataclass(frozen=True)
class Leftover:
    """A temporary folder of OUT whose merge died (SIGKILL, OOM, power loss) before finishing."""

    path: Path
    header: dict[str, Any] | None  # its journal's header; None if it died before writing one
    nbytes: int  # disk space it holds
    age_seconds: float  # since its last write


def find_leftovers(dest: Path) -> list[Leftover]:
    """OUT's stale temporary folders, newest first; folders a running merge holds are skipped."""
    found = []
    try:
        candidates = list(dest.parent.glob(f".{glob.escape(dest.name)}{TMP_MARK}*"))
    except OSError:
        return []
    for path in candidates:
        if not path.is_dir() or path.is_symlink() or journal.in_use(path):
            continue
        nbytes, newest = 0, path.stat().st_mtime
        for f in path.iterdir():
            try:
                st = f.lstat()
            except OSError:
                continue
            nbytes += st.st_blocks * 512
            newest = max(newest, st.st_mtime)
        found.append(Leftover(path, journal.read_header(path), nbytes, max(time.time() - newest, 0.0)))
    return sorted(found, key=lambda lo: lo.age_seconds)


def format_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _differs(header: dict[str, Any] | None, wanted: dict[str, Any]) -> str:
    """What changed between an interrupted run's plan and this one, in words ('' if nothing)."""
    if header is None:
        return "it was interrupted before it wrote anything resumable"
    if header.get("fingerprint") == wanted.get("fingerprint"):
        return ""
    old, new = header.get("parts") or {}, wanted.get("parts") or {}
    changed = []
    if old.get("plan") != new.get("plan"):
        changed.append("the recipe (or the plan made from it)")
    if old.get("inputs") != new.get("inputs"):
        changed.append("the input models' files")
    old_opts, new_opts = old.get("options") or {}, new.get("options") or {}
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            changed.append(f"{key} (was {old_opts.get(key)!r}, now {new_opts.get(key)!r})")
    return ", ".join(changed or ["the plan fingerprint"]) + " changed since"


class OutputDir:
    """Build OUT in a temporary sibling folder; ``commit`` renames it into place atomically.

    With ``journal_header`` (the plan's fingerprint) the folder carries a resume journal, and
    ``resume=True`` continues the newest interrupted folder of the same plan instead of
    starting a new one. Interrupted folders are never deleted silently: each one found is
    reported through ``notify`` with its size, age and the commands to resume or remove it.

    A symlinked OUT keeps pointing where it did: the output is built beside the link's target
    and replaces the target (``--overwrite``), so the link itself is never touched.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        overwrite: bool = False,
        *,
        journal_header: dict[str, Any] | None = None,
        resume: bool = False,
        resume_command: str | None = None,
        durable: bool = True,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.out = Path(out).absolute()
        # Build beside the link's target: renames stay on its filesystem and the link survives.
        self.dest = Path(os.path.realpath(self.out)) if self.out.is_symlink() else self.out
        self.overwrite = overwrite
        self.journal: journal.Journal | None = None
        self.resumed = False
        self.committed = False
        notify = notify or (lambda line: print(line, file=sys.stderr, flush=True))
        if self.dest.exists() and not overwrite:
            raise OutputError(
                f"{self.out} already exists; choose another OUT or pass --overwrite to replace it"
            )
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.out}: cannot create its folder ({e.strerror or e})") from e
        leftovers = find_leftovers(self.dest) if journal_header is not None else []
        self.leftovers = leftovers
        chosen = self._choose(leftovers, journal_header) if resume else None
        if resume and chosen is None:
            notify(f"note: nothing to resume for {self.out}: no interrupted merge of it was found; "
                   "starting afresh")
        for leftover in leftovers:
            if leftover is not chosen:
                notify(self._describe(leftover, journal_header or {}, resume_command))
        for old in self.dest.parent.glob(f".{glob.escape(self.dest.name)}.weightsmith-old-*"):
            notify(
                f"note: {old} holds what {self.out} held before an --overwrite that was killed "
                f"while swapping folders; move it back or remove it (rm -rf {shlex.quote(str(old))})"
            )
        fresh_name = f".{self.dest.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        self.tmp = chosen.path if chosen else self.dest.parent / fresh_name
        created = chosen is None
        try:
            if chosen is not None:
                self.journal = journal.Journal.reopen(self.tmp, durable)
                self.resumed = True
                notify(f"resuming the interrupted merge in {self.tmp} "
                       f"({len(self.journal.entries)} written blocks to re-check)")
            else:
                self.tmp.mkdir()
                if journal_header is not None:
                    self.journal = journal.Journal.create(self.tmp, journal_header, durable)
        except BaseException as e:  # Ctrl-C included: never leave a new empty folder behind
            if created:
                shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise OutputError(f"{self.out}: cannot prepare the output ({e.strerror or e})") from e
            raise

    def _choose(self, leftovers: list[Leftover], header: dict[str, Any] | None) -> Leftover | None:
        """The newest leftover of this very plan; a refusal if only other plans' are there."""
        header = header or {}
        for leftover in leftovers:
            if leftover.header is not None and not _differs(leftover.header, header):
                return leftover
        others = [lo for lo in leftovers if lo.header is not None]
        if others:
            lo = others[0]
            raise OutputError(
                f"cannot resume {self.out}: the interrupted merge in {lo.path} does not match this "
                f"one ({_differs(lo.header, header)}); resuming would mix two merges. "
                f"To start over, remove it (rm -rf {shlex.quote(str(lo.path))}) and run without "
                "--resume, or resume it with the recipe, inputs and options it was started with."
            )
        return None

    def _describe(self, leftover: Leftover, header: dict[str, Any], resume_command: str | None) -> str:
        what = (
            f"note: {leftover.path} ({format_size(leftover.nbytes)}, last written "
            f"{format_age(leftover.age_seconds)} ago) is left from an interrupted merge of {self.out}"
        )
        remove = f"remove it with: rm -rf {shlex.quote(str(leftover.path))}"
        diff = _differs(leftover.header, header)
        if diff:
            return f"{what}; it cannot be resumed by this command ({diff}); {remove}"
        resume = f"stop this run and run: {resume_command}" if resume_command else "pass --resume"
        return (
            f"{what}; this run starts afresh and leaves it in place. To continue it instead, "
            f"{resume}; or {remove}"
        )

    def path(self, name: str) -> Path:
        return self.tmp / name

    def write_text(self, name: str, text: str) -> None:
        try:
            (self.tmp / name).write_text(text)
        except OSError as e:
            raise _disk_error(e, self.tmp / name, out=self.out) from e

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def copy_file(self, src: Path, name: str | None = None) -> None:
        try:
            shutil.copyfile(src, self.tmp / (name or src.name))
        except OSError as e:
            raise _disk_error(e, self.tmp / (name or src.name), out=self.out) from e

    def commit(self) -> Path:
        if self.journal is not None:  # the journal describes an unfinished folder only
            self.journal.close()
            self.journal.path.unlink(missing_ok=True)
            self.journal = None
        old = None
        if os.path.lexists(self.dest):
            if not self.overwrite:
                raise OutputError(f"{self.out} appeared while merging; pass --overwrite to replace")
            old = self.dest.parent / f".{self.dest.name}.weightsmith-old-{uuid.uuid4().hex[:8]}"
            os.rename(self.dest, old)
        os.rename(self.tmp, self.dest)
        self.committed = True
        finished_outputs.record(self.out)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        return self.out

    def abort(self) -> None:
        if self.journal is not None:
            self.journal.close()
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
