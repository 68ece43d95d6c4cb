"""--ray-no-shared-fs, the parts that need no cluster: which byte ranges a worker streams, the
driver writing each chunk before it takes the next (its memory bound), and the check of every
shard against the worker's size and crc32. The Ray runs are in tests/test_ray_executor.py."""

import os
import zlib

import pytest
import torch

from weightsmith.engine import ray_stream
from weightsmith.engine.partition import ShardWork
from weightsmith.engine.ray_stream import (
    Chunk,
    Trailer,
    chunk_spans,
    receive_streams,
    shard_file,
    streamed_ranges,
)
from weightsmith.engine.run_stats import RunStats
from weightsmith.errors import MergeError, RecipeError
from weightsmith.io.journal import Entry
from weightsmith.io.writer import ShardWriter
from weightsmith.run_options import RunOptions

LAYOUT = [("a", torch.float32, (64, 4)), ("b", torch.float32, (32,)), ("c", torch.float32, (50, 2))]


class InlineRay:
    """What receive_streams uses of Ray, over plain Python generators: the first stream that is
    still open is always the ready one, and an item is its own object ref."""

    def wait(self, streams, num_returns):
        return streams[:num_returns], streams[num_returns:]

    def get(self, item):
        return item


def reference_shard(folder):
    """A shard as a worker would have it: laid out, then every tensor written."""
    folder.mkdir()
    writer = ShardWriter(folder, LAYOUT, 1 << 20)
    for k, (name, dtype, shape) in enumerate(LAYOUT):
        writer.write(name, torch.arange(k, k + torch.Size(shape).numel(), dtype=dtype).reshape(shape))
    writer.finish(fsync=False)
    return (folder / writer.names[0]).read_bytes()


@pytest.fixture
def driver(tmp_path):
    folder = tmp_path / "driver"
    folder.mkdir()
    writer = ShardWriter(folder, LAYOUT, 1 << 20)
    yield writer
    writer.close()


def worker_stream(data, ranges, chunk_bytes, driver_file=None, log=None, corrupt=None, drop=None):
    """A worker's generator: chunks of ``data``'s ranges, then the trailer. With ``driver_file``
    it checks, before each chunk after the first, that the driver already wrote the one before."""
    spans = chunk_spans(ranges, chunk_bytes)
    crc, previous = 0, None
    for i, (offset, n) in enumerate(spans):
        if previous is not None and driver_file is not None:
            at, m = previous
            with open(driver_file, "rb") as f:
                f.seek(at)
                log.append(f.read(m) == data[at:at + m])
        piece = data[offset:offset + n]
        crc = zlib.crc32(piece, crc)
        if i == corrupt:
            piece = bytes([piece[0] ^ 1]) + piece[1:]
        previous = (offset, n)
        if i != drop:
            yield Chunk(i, offset, piece)
    yield Trailer((RunStats(tensors=3), [], {"a": 1}), ranges, len(spans), sum(n for _, n in ranges), crc)


def test_streamed_ranges_skip_the_blocks_the_driver_already_holds():
    entry = lambda offset, nbytes: Entry("t", None, "s", offset, nbytes, 0, {})  # noqa: E731
    assert streamed_ranges(100, []) == [(0, 100)]
    assert streamed_ranges(100, [entry(60, 10), entry(20, 10)]) == [(0, 20), (30, 30), (70, 30)]
    assert streamed_ranges(100, [entry(90, 10)]) == [(0, 90)]
    assert chunk_spans([(0, 10), (30, 5)], 4) == [(0, 4), (4, 4), (8, 2), (30, 4), (34, 1)]


def test_shard_file_carries_the_header_and_slots_but_no_path(driver, tmp_path):
    want = reference_shard(tmp_path / "ref")
    shard = shard_file(driver, 0)
    assert shard.name == driver.names[0] and shard.size == len(want)
    assert want.startswith(shard.header) and str(tmp_path) not in repr(shard)
    assert {s.shard for s in shard.slots.values()} == {0}


def test_the_driver_writes_each_chunk_before_taking_the_next(driver, tmp_path):
    # The driver's memory bound: one chunk in hand at a time, whatever the shard's size.
    want = reference_shard(tmp_path / "ref")
    path = driver.folder / driver.names[0]
    log, done = [], []
    streams = {worker_stream(want, [(0, len(want))], 100, path, log): ShardWork(0, driver.names[0], [])}
    results = receive_streams(InlineRay(), streams, driver, done.append)
    assert len(log) == len(chunk_spans([(0, len(want))], 100)) - 1 > 5  # each on disk before the next came
    assert all(log)
    assert path.read_bytes() == want
    assert results[0][0].tensors == 3 and done == [0]


def test_only_the_streamed_ranges_are_written(driver, tmp_path):
    # Resume: the worker skips reused blocks; the driver's bytes there are left as they were.
    want = reference_shard(tmp_path / "ref")
    path = driver.folder / driver.names[0]
    kept = driver.span("b", None)[1:]  # (offset, nbytes) of a block the driver already holds
    os.pwrite(driver.fds[0], want[kept[0]:kept[0] + kept[1]], kept[0])
    ranges = streamed_ranges(len(want), [Entry("b", None, "s", *kept, 0, {})])
    streams = {worker_stream(want, ranges, 64): ShardWork(0, driver.names[0], [])}
    receive_streams(InlineRay(), streams, driver, None)
    assert path.read_bytes() == want


@pytest.mark.parametrize("fault", [{"corrupt": 2}, {"drop": 3}])
def test_a_shard_that_does_not_check_out_is_refused(driver, tmp_path, fault):
    want = reference_shard(tmp_path / "ref")
    streams = {worker_stream(want, [(0, len(want))], 128, **fault): ShardWork(0, driver.names[0], [])}
    with pytest.raises(MergeError, match="does not check out"):
        receive_streams(InlineRay(), streams, driver, None)


def test_a_stream_that_ends_without_its_trailer_is_refused(driver):
    streams = {iter([Chunk(0, 0, b"x")]): ShardWork(0, driver.names[0], [])}
    with pytest.raises(MergeError, match="without sending the whole shard"):
        receive_streams(InlineRay(), streams, driver, None)


def test_dead_workers_spools_are_swept_live_ones_kept(tmp_path):
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    (tmp_path / f"{ray_stream.SPOOL_PREFIX}{dead}-x").mkdir()
    (tmp_path / f"{ray_stream.SPOOL_PREFIX}{os.getpid()}-y").mkdir()
    (tmp_path / f"{ray_stream.SPOOL_PREFIX}other").mkdir()
    ray_stream.sweep_dead_spools(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{ray_stream.SPOOL_PREFIX}{os.getpid()}-y", f"{ray_stream.SPOOL_PREFIX}other"
    ]


def test_no_shared_fs_needs_the_ray_executor():
    with pytest.raises(RecipeError, match="--executor ray"):
        RunOptions(ray_shared_fs=False)
    assert not RunOptions(executor="ray", ray_shared_fs=False).ray_shared_fs


def test_the_resume_command_keeps_the_ray_options(tmp_path):
    from weightsmith.resume import resume_command_for

    path = tmp_path / "r.yaml"
    path.write_text("merge_method: linear\n")
    options = RunOptions(executor="ray", ray_address="head:6379", ray_shared_fs=False)
    command = resume_command_for(str(path), tmp_path / "out", options)
    assert command.endswith("--executor ray --ray-address head:6379 --ray-no-shared-fs --resume")
    assert "--executor" not in resume_command_for(str(path), tmp_path / "out", RunOptions())


class _Remote:
    """A Ray remote function's ``options`` that knows only the option names it is given."""

    def __init__(self, known: set[str]) -> None:
        self.known = known

    def options(self, **options):
        unknown = sorted(set(options) - self.known)
        if unknown:
            raise ValueError(f"Invalid option keyword {unknown[0]} for remote functions.")
        return options


class _Ray:
    __version__ = "9.9"

    def __init__(self, known: set[str]) -> None:
        self.known = known

    def remote(self, fn):
        return _Remote(self.known)


def test_streamed_task_uses_backpressure_and_survives_a_ray_without_it():
    from weightsmith.engine import ray_executor
    from weightsmith.notices import collecting

    base = {"max_retries", "memory", "num_returns"}
    with collecting(echo=False) as said:
        opts = ray_executor.streamed_task(_Ray(base | {ray_executor.BACKPRESSURE}), {"memory": 1})
    assert opts[ray_executor.BACKPRESSURE] == ray_stream.CHUNKS_IN_FLIGHT and not said
    with collecting(echo=False) as said:
        opts = ray_executor.streamed_task(_Ray(base), {"memory": 1})
    assert opts == {"memory": 1, "num_returns": "streaming"}
    assert len(said) == 1 and "Ray (9.9) has no _generator_backpressure_num_objects" in said[0]
    with pytest.raises(ValueError, match="memory"):  # any other refused option still fails
        ray_executor.streamed_task(_Ray({"num_returns"}), {"memory": 1})
