"""Atomic output folders and a sharded safetensors writer whose layout is fixed up front.

Because the plan knows every output tensor's dtype and shape before any math runs, each
shard's header is written first and its space reserved (``posix_fallocate``), so a full disk
fails at the start, not after an hour. Tensors (or row blocks of them) are then written with
``pwrite`` at their final offsets in any order: no shard is ever buffered in memory.

The folder is assembled as a hidden temporary sibling of OUT and renamed into place only when
complete; any error, Ctrl-C or SIGTERM removes it, so a half-written output never exists.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import OutputError
from weightsmith.io.safetensors_format import build_header, element_size
from weightsmith.units import format_size


def _disk_error(e: OSError, path: Path, need: int | None = None) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        extra = f" (needs {format_size(need)})" if need else ""
        return OutputError(
            f"{path}: disk full while writing the output{extra}; free space on "
            f"{path.parent} or choose another OUT. Nothing was left behind."
        )
    return OutputError(f"{path}: cannot write ({e.strerror or e})")


class OutputDir:
    """Build OUT in a temporary sibling folder; ``commit`` renames it into place atomically."""

    def __init__(self, out: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        if self.out.exists() and not overwrite:
            raise OutputError(
                f"{self.out} already exists; choose another OUT or pass --overwrite to replace it"
            )
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.weightsmith-tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.committed = False

    def path(self, name: str) -> Path:
        return self.tmp / name

    def write_text(self, name: str, text: str) -> None:
        try:
            (self.tmp / name).write_text(text)
        except OSError as e:
            raise _disk_error(e, self.tmp / name) from e

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def copy_file(self, src: Path, name: str | None = None) -> None:
        try:
            shutil.copyfile(src, self.tmp / (name or src.name))
        except OSError as e:
            raise _disk_error(e, self.tmp / (name or src.name)) from e

    def commit(self) -> Path:
        old = None
        if self.out.exists():
            if not self.overwrite:
                raise OutputError(f"{self.out} appeared while merging; pass --overwrite to replace")
            old = self.out.parent / f".{self.out.name}.weightsmith-old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
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


class ShardWriter:
    """Writes planned tensors into pre-laid-out safetensors shards."""

    def __init__(
        self,
        folder: Path,
        tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ) -> None:
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for item in tensors:
            nbytes = _nbytes(item[1], item[2])
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += nbytes
        count = len(groups)
        self.names = [
            "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            for i in range(count)
        ]
        self.folder = folder
        self.slots: dict[str, Slot] = {}
        self.fds: list[int] = []
        self.written: dict[str, int] = {}
        self.total_size = 0
        meta = {"format": "pt", **(metadata or {})}
        try:
            for i, group in enumerate(groups):
                prefix, offsets = build_header(group, meta)
                path = folder / self.names[i]
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self.fds.append(fd)
                data_bytes = sum(e - b for b, e in offsets.values())
                _reserve(fd, len(prefix) + data_bytes, path)
                os.pwrite(fd, prefix, 0)
                for name, _dtype, shape in group:
                    b, e = offsets[name]
                    rows = shape[0] if shape else 1
                    self.slots[name] = Slot(i, len(prefix) + b, e - b, (e - b) // max(rows, 1))
                    self.total_size += e - b
        except OSError as e:
            self.close()
            raise _disk_error(e, folder, self.total_size) from e

    def write(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Write a whole tensor, or rows [start, stop) of it, at its planned offset."""
        slot = self.slots[name]
        data = tensor.detach().contiguous()
        if data.device.type != "cpu":
            data = data.cpu()
        raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
        offset = slot.offset + (rows[0] * slot.row_bytes if rows else 0)
        expected = (rows[1] - rows[0]) * slot.row_bytes if rows else slot.nbytes
        if len(raw) != expected:
            raise AssertionError(f"{name}: wrote {len(raw)} bytes, planned {expected}")
        view = memoryview(raw).cast("B") if len(raw) else memoryview(b"")
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self.fds[slot.shard], view[done:], offset + done)
        except OSError as e:
            raise _disk_error(e, self.folder / self.names[slot.shard]) from e
        self.written[name] = self.written.get(name, 0) + expected

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
            raise _disk_error(e, self.folder) from e
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
