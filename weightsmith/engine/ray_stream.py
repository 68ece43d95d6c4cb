"""Shards streamed back to the driver: ``--executor ray --ray-no-shared-fs``, for clusters whose
workers cannot see the output folder.

A worker never gets the driver's output path. It lays its one shard out in a node-local spool
folder (the header bytes and the slots come from the driver's layout, so the file is the very
file a local run writes), runs the shard's sub-plan into it (engine/ray_shard.py), then reads
it back in chunks of ``chunk_bytes`` and yields them from a Ray streaming generator, followed
by a ``Trailer``: the journal entries, the byte ranges it streamed, and their size and crc32.
The worker deletes its spool folder when the stream ends (a killed worker's folder is swept by
the next task on that node).

The driver ``pwrite``s each chunk at its offset in its own laid-out shard as it arrives and
drops it, so it holds one chunk at a time; Ray's backpressure (``CHUNKS_IN_FLIGHT``) keeps each
task at most that many chunks ahead of the driver in the object store. Before the shard counts
as done the driver re-reads the streamed ranges from its own file and compares size and crc32
with the worker's. A retried task (a worker killed mid-stream) streams the same bytes to the
same offsets again, so duplicate chunks are harmless.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from weightsmith.engine.device_choice import DeviceChoice
from weightsmith.engine.executor import UnitKey
from weightsmith.engine.partition import ShardWork
from weightsmith.engine.ray_shard import ShardResult, die_if_marked, run_shard
from weightsmith.engine.tasks import MergePlan
from weightsmith.errors import MergeError, OutputError
from weightsmith.io.journal import Entry
from weightsmith.io.writer import ShardWriter, Slot

# Bytes per streamed chunk: big enough that per-object overhead is negligible, small enough
# that chunks in flight stay far below a worker's or the driver's memory.
CHUNK_BYTES = 8 << 20
# Chunks a task may yield ahead of the driver's consumption (Ray generator backpressure).
CHUNKS_IN_FLIGHT = 4
# Where workers spool their shard (node-local); default: the system temporary folder.
SPOOL_ENV = "WEIGHTSMITH_RAY_SPOOL"
SPOOL_PREFIX = "weightsmith-shard-"
# Test-only: a worker that finds this file removes it and exits right after its first chunk.
DIE_MID_STREAM_ENV = "WEIGHTSMITH_TEST_RAY_DIE_MID_STREAM"


@dataclass(frozen=True)
class ShardFile:
    """One shard as a worker lays it out alone: its file name, its header bytes (as the driver
    wrote them) and its tensors' slots, renumbered to shard 0 of a one-shard writer."""

    name: str
    header: bytes
    slots: dict[str, Slot]

    @property
    def size(self) -> int:
        return max([len(self.header), *(s.offset + s.nbytes for s in self.slots.values())])


@dataclass(frozen=True)
class Chunk:
    index: int
    offset: int
    data: bytes


@dataclass
class Trailer:
    """The last item of a shard's stream: what the worker computed and what it sent."""

    result: ShardResult
    ranges: list[tuple[int, int]]  # (offset, length) streamed, in order
    chunks: int
    nbytes: int
    crc32: int


def shard_file(writer: ShardWriter, shard: int) -> ShardFile:
    """Shard ``shard`` of the driver's writer, as a worker needs it (no path in it)."""
    slots = {n: replace(s, shard=0) for n, s in writer.slots.items() if s.shard == shard}
    header_bytes = min(s.offset for s in slots.values())  # the first tensor starts right after it
    return ShardFile(writer.names[shard], os.pread(writer.fds[shard], header_bytes, 0), slots)


def streamed_ranges(size: int, reused: list[Entry]) -> list[tuple[int, int]]:
    """[0, size) less the blocks of an interrupted run the driver already holds (``--resume``):
    the worker skips those, so it must not send its zeros over them."""
    ranges, at = [], 0
    for entry in sorted(reused, key=lambda e: e.offset):
        if entry.offset > at:
            ranges.append((at, entry.offset - at))
        at = max(at, entry.offset + entry.nbytes)
    if at < size:
        ranges.append((at, size - at))
    return ranges


def chunk_spans(ranges: list[tuple[int, int]], chunk_bytes: int) -> list[tuple[int, int]]:
    return [(off + k, min(chunk_bytes, n - k)) for off, n in ranges for k in range(0, n, chunk_bytes)]


def merge_shard_streamed(
    plan: MergePlan,
    indices: list[int],
    shard: ShardFile,
    device_choice: DeviceChoice,
    statistics: tuple[Any, int, int] | None,
    reused: dict[UnitKey, Entry],
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[Chunk | Trailer]:
    """One shard's work on a worker that cannot see the output: merged into a spool file,
    then yielded in chunks, then the ``Trailer``."""
    root = Path(os.environ.get(SPOOL_ENV) or tempfile.gettempdir())
    sweep_dead_spools(root)
    spool = Path(tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", dir=root))
    try:
        path = spool / shard.name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, shard.size)
            os.pwrite(fd, shard.header, 0)
        finally:
            os.close(fd)
        writer = ShardWriter.attach(spool, [shard.name], shard.slots)
        result = run_shard(plan, indices, writer, device_choice=device_choice, statistics=statistics,
                           reused=reused)
        ranges = streamed_ranges(shard.size, list(reused.values()))
        spans = chunk_spans(ranges, chunk_bytes)
        crc, fd = 0, os.open(path, os.O_RDONLY)
        try:
            for i, (offset, length) in enumerate(spans):
                data = _pread_all(fd, length, offset, path)
                crc = zlib.crc32(data, crc)
                yield Chunk(i, offset, data)
                die_if_marked(DIE_MID_STREAM_ENV)
        finally:
            os.close(fd)
        yield Trailer(result, ranges, len(spans), sum(n for _, n in ranges), crc)
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def sweep_dead_spools(root: Path) -> None:
    """Remove spool folders of worker processes that died mid-task (their finally never ran)."""
    for folder in root.glob(f"{SPOOL_PREFIX}*"):
        try:
            pid = int(folder.name[len(SPOOL_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue  # not one of ours
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            continue  # alive, another user's


def receive_streams(
    ray: Any,
    streams: dict[Any, ShardWork],
    writer: ShardWriter,
    progress: Callable[[int], None] | None,
) -> dict[int, ShardResult]:
    """The driver's side: write each arriving chunk into its shard, verify each finished shard
    against its trailer, and return the shard results (as the shared-filesystem tasks do)."""
    got: dict[int, set[int]] = {w.shard: set() for w in streams.values()}
    results: dict[int, ShardResult] = {}
    while streams:
        ready, _ = ray.wait(list(streams), num_returns=1)
        stream = ready[0]
        work = streams[stream]
        try:
            item = ray.get(next(stream))
        except StopIteration:
            raise MergeError(f"{work.name}: its Ray task ended without sending the whole shard") from None
        if isinstance(item, Chunk):
            write_chunk(writer, work.shard, item)
            got[work.shard].add(item.index)
            continue
        del streams[stream]
        verify_shard(writer, work.shard, item, got.pop(work.shard))
        results[work.shard] = item.result
        if progress:
            progress(work.bytes_to_write)
    return results


def write_chunk(writer: ShardWriter, shard: int, chunk: Chunk) -> None:
    view, done = memoryview(chunk.data), 0
    try:
        while done < len(view):
            done += os.pwrite(writer.fds[shard], view[done:], chunk.offset + done)
    except OSError as e:
        raise OutputError(f"{writer.folder / writer.names[shard]}: cannot write a streamed chunk "
                          f"({e.strerror})") from e


def verify_shard(writer: ShardWriter, shard: int, trailer: Trailer, got: set[int]) -> None:
    """Every chunk arrived, and the bytes now in the driver's file are the worker's: same
    size, same crc32. Then the shard is made durable before its blocks are journaled."""
    path = writer.folder / writer.names[shard]
    missing = trailer.chunks - len(got & set(range(trailer.chunks)))
    crc, size = 0, 0
    for offset, length in trailer.ranges:
        for at, n in chunk_spans([(offset, length)], CHUNK_BYTES):
            data = _pread_all(writer.fds[shard], n, at, path)
            crc, size = zlib.crc32(data, crc), size + len(data)
    if missing or size != trailer.nbytes or crc != trailer.crc32:
        raise MergeError(
            f"{path}: the shard streamed back from its Ray worker does not check out ({missing} of "
            f"{trailer.chunks} chunks missing; {size} of {trailer.nbytes} bytes, crc32 {crc:08x} vs the "
            f"worker's {trailer.crc32:08x}); run the merge again"
        )
    os.fsync(writer.fds[shard])


def _pread_all(fd: int, length: int, offset: int, path: Path) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise OutputError(f"{path}: {len(data)} of {length} bytes at offset {offset}; the file is short")
        data += more
    return data
