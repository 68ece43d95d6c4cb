"""Atomic output folders and a sharded safetensors writer whose layout is fixed up front.

Because the plan knows every output tensor's dtype and shape before any math runs, each
shard's header is written first and its space reserved (``posix_fallocate``), so a full disk
fails at the start, not after an hour. Tensors (or row blocks of them) are then written with
``pwrite`` at their final offsets in any order: no shard is ever buffered in memory.

The folder is assembled as a hidden temporary sibling of OUT and renamed into place only when
complete; any error, Ctrl-C or SIGTERM removes it, so a half-written output never exists.
A process that dies without cleaning up (SIGKILL, OOM killer, power loss) leaves the folder
with a journal of the blocks already written (io/journal.py): the next run of the same plan
reports it, and ``--resume`` continues it, re-checking every reused block.
"""

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
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import OutputError
from weightsmith.io import journal
from weightsmith.io.safetensors_format import build_header, element_size
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


@dataclass(frozen=True)
class Slot:
    shard: int
    offset: int  # absolute file offset of the tensor's first byte
    nbytes: int
    row_bytes: int


Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]


def shard_groups(tensors: Layout, max_shard_bytes: int) -> list[Layout]:
    """The tensors of each output shard, in order: a function of the plan alone, so a
    distributed run knows which tensors share a shard before anything is written."""
    groups: list[Layout] = [[]]
    size = 0
    for item in tensors:
        nbytes = _nbytes(item[1], item[2])
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
    return groups


def shard_names(count: int) -> list[str]:
    return [
        "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        for i in range(count)
    ]


class ShardWriter:
    """Writes planned tensors into pre-laid-out safetensors shards.

    ``resume=True`` keeps the shards an interrupted run of the same plan left (the layout is a
    function of the plan, so their headers must match byte for byte; a shard whose header does
    not is laid out afresh), and ``reuse`` then accepts the journaled ranges whose bytes still
    check out. ``out`` is the folder named in error messages.
    """

    def __init__(
        self,
        folder: Path,
        tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
        *,
        out: Path | None = None,
        resume: bool = False,
    ) -> None:
        groups = shard_groups(tensors, max_shard_bytes)
        self.names = shard_names(len(groups))
        self.folder = folder
        self.out = out
        self.slots: dict[str, Slot] = {}
        self.fds: list[int] = []
        self.written: dict[str, int] = {}
        self.fresh: set[int] = set()  # shards laid out by this run (nothing in them to reuse)
        self.total_size = 0
        meta = {"format": "pt", **(metadata or {})}
        layouts = []
        for i, group in enumerate(groups):
            prefix, offsets = build_header(group, meta)
            layouts.append((prefix, offsets, len(prefix) + sum(e - b for b, e in offsets.values())))
            for name, _dtype, shape in group:
                b, e = offsets[name]
                rows = shape[0] if shape else 1
                self.slots[name] = Slot(i, len(prefix) + b, e - b, (e - b) // max(rows, 1))
                self.total_size += e - b
        need = sum(layout[2] for layout in layouts)
        try:
            for i, (prefix, _offsets, file_bytes) in enumerate(layouts):
                path = folder / self.names[i]
                flags = os.O_RDWR | os.O_CREAT | (0 if resume else os.O_TRUNC)
                fd = os.open(path, flags, 0o644)
                self.fds.append(fd)
                if resume and os.pread(fd, len(prefix), 0) == prefix:
                    _reserve(fd, file_bytes, path)  # already there: allocates nothing new
                    continue
                os.ftruncate(fd, 0)
                self.fresh.add(i)
                _reserve(fd, file_bytes, path)
                os.pwrite(fd, prefix, 0)
        except OSError as e:
            self.close()
            raise _disk_error(e, folder, need, out) from e

    @classmethod
    def attach(
        cls, folder: Path, names: list[str], slots: dict[str, Slot], out: Path | None = None
    ) -> ShardWriter:
        """A writer onto shards another process laid out (a distributed run's workers): the
        files are opened for writing as they are, never created, truncated or re-laid out."""
        self = cls.__new__(cls)
        self.folder, self.out, self.names, self.slots = folder, out, list(names), dict(slots)
        self.fds, self.written, self.fresh = [], {}, set()
        self.total_size = sum(s.nbytes for s in self.slots.values())
        try:
            for name in self.names:
                self.fds.append(os.open(folder / name, os.O_WRONLY))
        except OSError as e:
            self.close()
            raise OutputError(
                f"{folder / name}: cannot open the output shard for writing ({e.strerror}); with "
                "--executor ray every node must see the output folder's parent at the same path"
            ) from e
        return self

    def span(self, name: str, rows: tuple[int, int] | None) -> tuple[int, int, int]:
        """(shard index, absolute offset, length) of a tensor or a block of its rows."""
        slot = self.slots[name]
        if rows is None:
            return slot.shard, slot.offset, slot.nbytes
        return slot.shard, slot.offset + rows[0] * slot.row_bytes, (rows[1] - rows[0]) * slot.row_bytes

    def write(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> int:
        """Write a whole tensor, or rows [start, stop) of it, at its planned offset; return the
        crc32 of the bytes written (for the resume journal)."""
        shard, offset, expected = self.span(name, rows)
        data = tensor.detach().contiguous()
        if data.device.type != "cpu":
            data = data.cpu()
        raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
        if len(raw) != expected:
            raise AssertionError(f"{name}: wrote {len(raw)} bytes, planned {expected}")
        view = memoryview(raw).cast("B") if len(raw) else memoryview(b"")
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self.fds[shard], view[done:], offset + done)
        except OSError as e:
            raise _disk_error(e, self.folder / self.names[shard], self.total_size, self.out) from e
        self.written[name] = self.written.get(name, 0) + expected
        return journal.checksum(view)

    def reuse(
        self, entries: list[journal.Entry], blocks: set[tuple[str, tuple[int, int] | None]]
    ) -> dict[tuple[str, tuple[int, int] | None], journal.Entry]:
        """The journaled blocks whose bytes are still on disk as recorded, keyed by (tensor, rows).

        Only blocks this run would write (``blocks``: another memory budget splits rows
        differently) are considered. Each is re-read and its crc32 compared; a block of a
        re-laid-out shard, one whose place moved, or one whose bytes changed is left out, so it
        is computed again.
        """
        latest: dict[tuple[str, tuple[int, int] | None], journal.Entry] = {}
        for entry in entries:
            latest[(entry.tensor, entry.rows)] = entry  # a redo supersedes the earlier entry
        good = {}
        for key, entry in latest.items():
            if key not in blocks or entry.tensor not in self.slots:
                continue
            shard, offset, nbytes = self.span(*key)
            if (
                shard in self.fresh
                or self.names[shard] != entry.shard
                or (offset, nbytes) != (entry.offset, entry.nbytes)
                or self._crc(shard, offset, nbytes) != entry.crc32
            ):
                continue
            good[key] = entry
            self.written[entry.tensor] = self.written.get(entry.tensor, 0) + nbytes
        return good

    def _crc(self, shard: int, offset: int, nbytes: int, chunk: int = 1 << 26) -> int | None:
        crc, done = 0, 0
        while done < nbytes:
            data = os.pread(self.fds[shard], min(chunk, nbytes - done), offset + done)
            if not data:
                return None  # shorter than planned
            crc = zlib.crc32(data, crc)
            done += len(data)
        return crc

    def finish(self, fsync: bool = True) -> dict[str, Any]:
        """Check every byte was written, flush, and return the index."""
        missing = [n for n, s in self.slots.items() if self.written.get(n, 0) != s.nbytes]
        if missing:
            raise AssertionError(f"tensors not (fully) written: {missing[:5]}")
        try:
            if fsync:
                for fd in self.fds:
                    os.fsync(fd)
        except OSError as e:
            raise _disk_error(e, self.folder, self.total_size, self.out) from e
        finally:
            self.close()
        return {
            "metadata": {"total_size": self.total_size},
            "weight_map": {n: self.names[s.shard] for n, s in self.slots.items()},
        }

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = element_size(dtype)
    for d in shape:
        n *= d
    return n


def _reserve(fd: int, nbytes: int, path: Path) -> None:
    """Reserve disk space now so a full disk is reported before any work is done."""
    if nbytes == 0:
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
            os.ftruncate(fd, nbytes)  # filesystem cannot preallocate; sparse file instead
        else:
            raise
