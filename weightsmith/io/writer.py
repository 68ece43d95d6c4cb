"""A sharded safetensors writer whose layout is fixed up front.

Because the plan knows every output tensor's dtype and shape before any math runs, each
shard's header is written first and its space reserved (``posix_fallocate``), so a full disk
fails at the start, not after an hour. Tensors (or row blocks of them) are then written with
``pwrite`` at their final offsets in any order: no shard is ever buffered in memory.

The shards go into an atomic output folder (io/output_dir.py). A process that dies without
cleaning up leaves the folder with a journal of the blocks already written (io/journal.py):
the next run of the same plan reports it, and ``--resume`` continues it, re-checking every
reused block.
"""

from __future__ import annotations

import errno
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import OutputError
from weightsmith.io import journal
from weightsmith.io.output_dir import _disk_error
from weightsmith.io.safetensors_format import build_header, element_size


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

    def write(
        self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None, *, checksum: bool = True
    ) -> int:
        """Write a whole tensor, or rows [start, stop) of it, at its planned offset; return the
        crc32 of the bytes written (for the resume journal), or 0 without ``checksum`` (no
        journal records it: a crc32 pass costs about a second per GB here)."""
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
        return journal.checksum(view) if checksum else 0

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
