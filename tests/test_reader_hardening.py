"""Hostile or broken inputs to the readers: each ends in one CheckpointError naming the file.

Safetensors headers are held to the reference library's rules (every byte of the data buffer
covered exactly once, integer offsets and shapes), index files may not reach outside their
model folder, and anything that is not a regular file is refused before it is opened.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time

import pytest
import torch
from click.testing import CliRunner
from models import LLAMA_CONFIG, random_state, save_model
from safetensors import safe_open
from safetensors.torch import save_file

from weightsmith.cli import main
from weightsmith.errors import CheckpointError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.io.hub_push import PushError, collect_output_files
from weightsmith.io.safetensors_format import read_header

U8 = '"dtype":"U8"'


def write_raw(path, header: bytes | str, data: bytes = b""):
    """A safetensors file with exactly this header text and data buffer."""
    raw = header.encode() if isinstance(header, str) else header
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def reference_accepts(path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------- item 3: tiling
@pytest.mark.parametrize(
    "header, data, message",
    [
        # a hole between two tensors: byte 2 belongs to no tensor
        (f'{{"a":{{{U8},"shape":[2],"data_offsets":[0,2]}},"b":{{{U8},"shape":[1],"data_offsets":[3,4]}}}}',
         b"abcd", "belong to no tensor"),
        # the first tensor does not start at byte 0
        (f'{{"a":{{{U8},"shape":[3],"data_offsets":[1,4]}}}}', b"abcd", "belong to no tensor"),
        # trailing bytes after the last tensor
        (f'{{"a":{{{U8},"shape":[4],"data_offsets":[0,4]}}}}', b"abcde", "trailing"),
        ('{}', b"x", "trailing"),
        # overlap
        (f'{{"a":{{{U8},"shape":[4],"data_offsets":[0,4]}},"b":{{{U8},"shape":[2],"data_offsets":[2,4]}}}}',
         b"abcd", "overlap"),
        # a zero-size tensor inside another one's span
        (f'{{"a":{{{U8},"shape":[4],"data_offsets":[0,4]}},"z":{{{U8},"shape":[0],"data_offsets":[2,2]}}}}',
         b"abcd", "overlap"),
        # begin > end
        (f'{{"a":{{{U8},"shape":[0],"data_offsets":[4,0]}}}}', b"abcd", "data_offsets"),
        # non-integers: float, exponent, -0 (a float to the reference), string, bool, Infinity, NaN
        (f'{{"a":{{{U8},"shape":[4],"data_offsets":[0,4.0]}}}}', b"abcd", "integer"),
        (f'{{"a":{{{U8},"shape":[4],"data_offsets":[0,4e0]}}}}', b"abcd", "integer"),
        (f'{{"a":{{{U8},"shape":[4],"data_offsets":[-0,4]}}}}', b"abcd", "integer"),
        (f'{{"a":{{{U8},"shape":["4"],"data_offsets":[0,4]}}}}', b"abcd", "integer"),
        (f'{{"a":{{{U8},"shape":[true],"data_offsets":[0,1]}}}}', b"a", "integer"),
        (f'{{"a":{{{U8},"shape":[4],"data_offsets":[0,Infinity]}}}}', b"abcd", "not valid JSON"),
        (f'{{"a":{{{U8},"shape":[NaN],"data_offsets":[0,4]}}}}', b"abcd", "not valid JSON"),
        # negative dims and offsets
        (f'{{"a":{{{U8},"shape":[-4],"data_offsets":[0,4]}}}}', b"abcd", "negative"),
        (f'{{"a":{{{U8},"shape":[2,-2,-1],"data_offsets":[0,4]}}}}', b"abcd", "negative"),
        # data_offsets not a 2-list
        (f'{{"a":{{{U8},"shape":[4],"data_offsets":[0,4,4]}}}}', b"abcd", "data_offsets"),
        (f'{{"a":{{{U8},"shape":[4],"data_offsets":{{"0":0}}}}}}', b"abcd", "data_offsets"),
        # huge numbers
        (f'{{"a":{{{U8},"shape":[18446744073709551615,2],"data_offsets":[0,4]}}}}', b"abcd", "too large"),
        (f'{{"a":{{{U8},"shape":[{"9" * 5000}],"data_offsets":[0,4]}}}}', b"abcd", "integer"),
        (f'{{"a":{{{U8},"shape":[4],"data_offsets":[0,{"9" * 30}]}}}}', b"abcd", "integer"),
        # a field given twice in one entry (the reference refuses it)
        (f'{{"a":{{{U8},"shape":[4],"shape":[4],"data_offsets":[0,4]}}}}', b"abcd", "twice"),
        # NUL padding after the JSON (the reference refuses it; spaces are the padding)
        (f'{{"a":{{{U8},"shape":[4],"data_offsets":[0,4]}}}}\x00\x00', b"abcd", "not valid JSON"),
    ],
)
def test_headers_the_reference_refuses_are_refused(tmp_path, header, data, message):
    path = write_raw(tmp_path / "m" / "model.safetensors", header, data)
    assert not reference_accepts(path)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(path.parent)
    assert str(path) in str(e.value) and message in str(e.value)


def test_a_hole_would_otherwise_merge_shifted_weights(tmp_path):
    """The audit's case: a one-element gap shifts every later tensor by one element."""
    path = tmp_path / "m" / "model.safetensors"
    path.parent.mkdir()
    save_file({"a": torch.arange(4.0), "b": torch.arange(4.0) + 10}, str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["b"]["data_offsets"] = [20, 32]
    header["b"]["shape"] = [3]
    write_raw(path, json.dumps(header), raw[8 + n :])
    with pytest.raises(CheckpointError, match="belong to no tensor"):
        read_header(str(path))


@pytest.mark.parametrize(
    "header, data",
    [
        ('{}', b""),
        # zero-size tensors: at a boundary, at the end, several at one offset, huge-but-empty shapes
        (f'{{"a":{{{U8},"shape":[2],"data_offsets":[0,2]}},"z":{{"dtype":"F32","shape":[0,3],'
         f'"data_offsets":[2,2]}},"b":{{{U8},"shape":[2],"data_offsets":[2,4]}}}}', b"abcd"),
        (f'{{"a":{{{U8},"shape":[4],"data_offsets":[0,4]}},"z":{{"dtype":"F32","shape":[0],'
         f'"data_offsets":[4,4]}}}}', b"abcd"),
        ('{"y":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
         '"z":{"dtype":"BF16","shape":[5,0],"data_offsets":[0,0]}}', b""),
        # whitespace around the JSON, unknown extra fields, null metadata, a scalar
        (f'  {{"__metadata__":null,"a":{{{U8},"shape":[],"data_offsets":[0,1]}}}}\t\n ', b"a"),
        (f'{{"a":{{{U8},"shape":[4],"data_offsets":[0,4],"extra":[1,"x"]}}}}', b"abcd"),
    ],
)
def test_headers_the_reference_accepts_are_accepted(tmp_path, header, data):
    path = write_raw(tmp_path / "m" / "model.safetensors", header, data)
    assert reference_accepts(path)
    ckpt = Checkpoint.open(path.parent)
    with safe_open(str(path), "pt") as f:
        assert set(ckpt.keys()) == set(f.keys())
        for k in f.keys():
            assert torch.equal(ckpt.read(k), f.get_tensor(k))


# ---------------------------------------------------------------------------- item 5: no stray exceptions
@pytest.mark.parametrize(
    "header, message",
    [
        ('{"a":{"dtype":["U8"],"shape":[4],"data_offsets":[0,4]}}', "dtype"),
        ('{"a":{"dtype":{"x":1},"shape":[4],"data_offsets":[0,4]}}', "dtype"),
        ('{"a":{"dtype":null,"shape":[4],"data_offsets":[0,4]}}', "dtype"),
        (f'{{"__metadata__":[1],"a":{{{U8},"shape":[4],"data_offsets":[0,4]}}}}', "__metadata__"),
        (f'{{"__metadata__":"x","a":{{{U8},"shape":[4],"data_offsets":[0,4]}}}}', "__metadata__"),
        (f'{{"__metadata__":{{"k":1}},"a":{{{U8},"shape":[4],"data_offsets":[0,4]}}}}', "__metadata__"),
        (f'{{"__metadata__":{{"k":{{"x":"y"}}}},"a":{{{U8},"shape":[4],"data_offsets":[0,4]}}}}',
         "__metadata__"),
        (f'{{"a":{{{U8},"shape":4,"data_offsets":[0,4]}}}}', "shape"),
        (f'{{"a":{{{U8},"shape":{{"0":4}},"data_offsets":[0,4]}}}}', "shape"),
        ('{"a":[1,2]}', "'a'"),
        ('{"a":null}', "'a'"),
        ('[]', "not a JSON object"),
        ('{"a":' + "[" * 200_000 + "]" * 200_000 + "}", "nested"),
        ('{"\\ud800":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', "not valid JSON"),
        ('{"__metadata__":{"k":"\\udfff"},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
         "not valid JSON"),
    ],
)
def test_malformed_entries_are_checkpoint_errors(tmp_path, header, message):
    path = write_raw(tmp_path / "m" / "model.safetensors", header, b"abcd")
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(path.parent)
    assert str(path) in str(e.value) and message in str(e.value)


def test_huge_declared_tensor_never_allocates(tmp_path):
    """A header declaring terabytes is refused from the header alone (file size bounds it)."""
    big = 2**40
    path = write_raw(
        tmp_path / "m" / "model.safetensors",
        f'{{"a":{{"dtype":"F32","shape":[{big // 4}],"data_offsets":[0,{big}]}}}}',
        b"abcd",
    )
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(str(path))


@pytest.mark.parametrize("config", ["[1, 2]", '"llama"', "null", "[" * 100_000 + "]" * 100_000,
                                    '{"text_config": [1]}', b"\xff\xfe{}"])
def test_config_json_that_is_not_an_object(tmp_path, config):
    folder = save_model(tmp_path / "m", random_state(LLAMA_CONFIG, 1), None, shards=1)
    cfg = folder / "config.json"
    cfg.write_bytes(config if isinstance(config, bytes) else config.encode())
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    assert str(cfg) in str(e.value)


def test_inspect_with_odd_architectures_prints_a_line_not_a_traceback(tmp_path):
    config = {**LLAMA_CONFIG, "architectures": 7}
    folder = save_model(tmp_path / "m", random_state(LLAMA_CONFIG, 1), config, shards=1)
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "architecture: 7" in result.output
    (folder / "config.json").write_text("[]")
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exit_code == CheckpointError.exit_code and isinstance(result.exception, SystemExit)
    assert "config.json" in result.output


@pytest.fixture
def pushable(tmp_path):
    folder = save_model(tmp_path / "out", random_state(LLAMA_CONFIG, 1), LLAMA_CONFIG, shards=2)
    return folder


@pytest.mark.parametrize(
    "index",
    [
        '{"weight_map": ' + "[" * 200_000 + "]" * 200_000 + "}",
        '{"weight_map": {"a": ["x"]}}',
        '{"weight_map": []}',
        "[]",
    ],
)
def test_push_validation_of_a_hostile_index(pushable, index):
    (pushable / "model.safetensors.index.json").write_text(index)
    with pytest.raises(PushError) as e:
        collect_output_files(pushable)
    assert "model.safetensors.index.json" in str(e.value)


def test_push_validation_of_a_hostile_shard_header(pushable):
    shard = pushable / "model-00001-of-00002.safetensors"
    write_raw(shard, '{"a":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}', b"abcd")
    with pytest.raises(PushError) as e:
        collect_output_files(pushable)
    assert str(shard) in str(e.value)


@pytest.mark.parametrize("report", ["[]", "[" * 100_000 + "]" * 100_000, '"x"'])
def test_push_with_a_damaged_merge_report(tmp_path, report):
    import weightsmith
    from weightsmith.io.hub_push import push_to_hub
    from weightsmith.io.model_card import REPORT_FILE

    base = save_model(tmp_path / "base", random_state(LLAMA_CONFIG, 1), LLAMA_CONFIG, shards=1)
    out = tmp_path / "out"
    recipe = {"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 1.0}}]}
    weightsmith.merge(recipe, out)
    (out / REPORT_FILE).write_text(report)
    with pytest.raises(PushError) as e:  # refused before any network access
        push_to_hub(out, "acme/merged")
    assert str(out / REPORT_FILE) in str(e.value)


@pytest.mark.parametrize("state", [[torch.ones(2)], {1: torch.ones(2)}, torch.ones(2)])
def test_pickle_that_is_not_a_state_dict(tmp_path, state):
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder, allow_pickle=True)
    assert "pytorch_model.bin" in str(e.value) and "state dict" in str(e.value)


# ---------------------------------------------------------------------------- item 4: index escapes
def _index(folder):
    return folder / "model.safetensors.index.json"


def _point(folder, key, shard):
    index = json.loads(_index(folder).read_text())
    index["weight_map"][key] = shard
    _index(folder).write_text(json.dumps(index))


@pytest.fixture
def two_models(tmp_path):
    state = random_state(LLAMA_CONFIG, 1)
    mine = save_model(tmp_path / "mine", state, LLAMA_CONFIG, shards=2)
    other = save_model(tmp_path / "other", state, LLAMA_CONFIG, shards=2)
    return mine, other


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "symlinked_dir"])
def test_index_may_not_reach_outside_the_model_folder(two_models, kind):
    mine, other = two_models
    key = "model.norm.weight"
    shard = json.loads(_index(mine).read_text())["weight_map"][key]
    target = other / shard
    if kind == "dotdot":
        name = f"../other/{shard}"
    elif kind == "absolute":
        name = str(target)
    elif kind == "symlink":
        (mine / shard).unlink()
        (mine / shard).symlink_to(target)
        name = shard
    else:
        (mine / "sub").symlink_to(other, target_is_directory=True)
        name = f"sub/{shard}"
    for k, v in json.loads(_index(mine).read_text())["weight_map"].items():
        if v == shard:
            _point(mine, k, name)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(mine)
    text = str(e.value)
    assert str(_index(mine)) in text and name in text and "outside" in text
    assert repr(key) in text or "model." in text  # names a key that points there


@pytest.mark.parametrize(
    "weight_map, message",
    [
        ('{"a": ["model-00001-of-00002.safetensors"]}', "'a'"),
        ('{"a": 3}', "'a'"),
        ('{"a": null}', "'a'"),
        ('["model.safetensors"]', "weight_map"),
        ('"model.safetensors"', "weight_map"),
        ('{"a": ""}', "'a'"),
        ('{"a": "x\\u0000y.safetensors"}', "'a'"),
    ],
)
def test_index_with_malformed_weight_map(tmp_path, weight_map, message):
    folder = save_model(tmp_path / "m", random_state(LLAMA_CONFIG, 1), LLAMA_CONFIG, shards=2)
    _index(folder).write_text('{"weight_map": ' + weight_map + "}")
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    assert str(_index(folder)) in str(e.value) and message in str(e.value)


def test_index_nested_too_deep(tmp_path):
    folder = save_model(tmp_path / "m", random_state(LLAMA_CONFIG, 1), LLAMA_CONFIG, shards=2)
    _index(folder).write_text('{"weight_map": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    assert str(_index(folder)) in str(e.value)


def test_index_shard_in_a_subfolder_is_fine(tmp_path):
    state = random_state(LLAMA_CONFIG, 1)
    folder = save_model(tmp_path / "m", state, LLAMA_CONFIG, shards=2)
    (folder / "weights").mkdir()
    for shard in sorted(folder.glob("model-*.safetensors")):
        shard.rename(folder / "weights" / shard.name)
    index = json.loads(_index(folder).read_text())
    index["weight_map"] = {k: f"weights/{v}" for k, v in index["weight_map"].items()}
    _index(folder).write_text(json.dumps(index))
    ckpt = Checkpoint.open(folder)
    assert all(torch.equal(ckpt.read(k), v) for k, v in state.items())


# ---------------------------------------------------------------------------- item 8: not a regular file
class _FifoReleaser:
    """Opens the FIFO for writing whenever a reader blocks on it, so a reader that (wrongly) opens
    it fails the test instead of hanging it; stops when the test is done."""

    def __init__(self, path):
        self.path, self.stop, self.released = path, threading.Event(), False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno not in (errno.ENXIO, errno.ENOENT):
                    raise
                time.sleep(0.02)
                continue
            os.close(fd)
            self.released = True

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.mark.parametrize("where", ["single", "shard", "index", "config"])
def test_fifo_is_refused_without_opening_it(tmp_path, where):
    state = random_state(LLAMA_CONFIG, 1)
    folder = save_model(tmp_path / "m", state, LLAMA_CONFIG, shards=1 if where == "single" else 2)
    target = {
        "single": folder / "model.safetensors",
        "shard": folder / "model-00002-of-00002.safetensors",
        "index": _index(folder),
        "config": folder / "config.json",
    }[where]
    target.unlink()
    os.mkfifo(target)
    with _FifoReleaser(target) as releaser, pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    assert not releaser.released, "the reader opened the FIFO"
    assert str(target) in str(e.value) and "not a regular file" in str(e.value)


def test_fifo_named_directly_is_refused(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    with _FifoReleaser(fifo) as releaser:
        with pytest.raises(CheckpointError) as e:
            read_header(str(fifo))
        with pytest.raises(CheckpointError) as e2:
            Checkpoint.open(fifo)
    assert not releaser.released
    assert "not a regular file" in str(e.value) and "not a regular file" in str(e2.value)
    assert str(fifo) in str(e2.value)


@pytest.mark.parametrize("kind", ["device", "directory"])
def test_device_or_directory_as_shard(tmp_path, kind):
    # one file, no index: the index rule (nothing outside the folder) would refuse /dev/zero first
    folder = save_model(tmp_path / "m", random_state(LLAMA_CONFIG, 1), LLAMA_CONFIG, shards=1)
    shard = folder / "model.safetensors"
    shard.unlink()
    if kind == "device":
        shard.symlink_to("/dev/zero")
    else:
        shard.mkdir()
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    assert str(shard) in str(e.value) and "not a regular file" in str(e.value)
