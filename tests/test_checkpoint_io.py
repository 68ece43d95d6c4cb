import json
import struct

import pytest
import torch
from models import LLAMA_CONFIG, random_state, save_model
from safetensors.torch import save_file

from weightsmith.errors import CheckpointError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.io.safetensors_format import build_header, read_header


def test_reads_sharded_folder_single_file_and_rows(tmp_path):
    state = random_state(LLAMA_CONFIG, seed=1)
    folder = save_model(tmp_path / "m", state, LLAMA_CONFIG, shards=3)
    ckpt = Checkpoint.open(folder)
    assert set(ckpt.keys()) == set(state)
    assert len(ckpt.shard_files) == 3
    for k, v in state.items():
        assert torch.equal(ckpt.read(k), v)
    emb = state["model.embed_tokens.weight"]
    assert torch.equal(ckpt.read("model.embed_tokens.weight", rows=(5, 9)), emb[5:9])
    single = tmp_path / "one.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(single))
    one = Checkpoint.open(single)
    assert one.read("a").tolist() == [[0, 1, 2], [3, 4, 5]]


def test_relative_paths_resolve_against_search_dirs(tmp_path):
    save_model(tmp_path / "m", random_state(LLAMA_CONFIG, seed=1), LLAMA_CONFIG, shards=1)
    assert Checkpoint.open("m", search_dirs=(tmp_path,)).root == tmp_path / "m"


def test_missing_model_names_the_places_looked(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        Checkpoint.open(tmp_path / "absent")


def test_header_roundtrip_matches_reference_reader(tmp_path):
    from safetensors import safe_open

    tensors = [("b", torch.bfloat16, (3, 4)), ("a", torch.float32, (2,)), ("i", torch.int64, ())]
    prefix, offsets = build_header(tensors, {"format": "pt"})
    data = {"b": torch.randn(3, 4).bfloat16(), "a": torch.randn(2), "i": torch.tensor(7)}
    body = bytearray(sum(e - s for s, e in offsets.values()))
    for name, (s, e) in offsets.items():
        body[s:e] = data[name].reshape(-1).view(torch.uint8).numpy().tobytes()
    path = tmp_path / "x.safetensors"
    path.write_bytes(prefix + bytes(body))
    assert len(prefix) % 8 == 0
    with safe_open(str(path), "pt") as f:
        for name, t in data.items():
            assert torch.equal(f.get_tensor(name), t)
    entries, meta = read_header(str(path))
    assert meta == {"format": "pt"} and entries["b"].shape == (3, 4)


def _one_shard(tmp_path):
    path = tmp_path / "m" / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file({"w": torch.ones(4, 4), "v": torch.zeros(8)}, str(path))
    return path


def test_truncated_shard_is_reported_with_file_and_tensor(tmp_path):
    path = _one_shard(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(path.parent)
    assert str(path) in str(e.value) and "truncated" in str(e.value)


def test_truncated_header_is_reported(tmp_path):
    path = _one_shard(tmp_path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="truncated or not safetensors"):
        Checkpoint.open(path.parent)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="no safetensors header"):
        Checkpoint.open(path.parent)


def test_corrupt_json_header(tmp_path):
    path = _one_shard(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[8] = ord("#")
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Checkpoint.open(path.parent)


def _rewrite_header(path, mutate):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_header_that_lies_about_offsets(tmp_path):
    path = _one_shard(tmp_path)

    def overlap(h):
        h["w"]["data_offsets"] = list(h["v"]["data_offsets"])
        h["w"]["shape"] = [2, 4]

    _rewrite_header(path, overlap)
    with pytest.raises(CheckpointError, match="overlap"):
        Checkpoint.open(path.parent)

    path = _one_shard(tmp_path / "b")

    def wrong_size(h):
        h["w"]["shape"] = [5, 4]

    _rewrite_header(path, wrong_size)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(path.parent)
    assert "'w'" in str(e.value) and "corrupt" in str(e.value)


def test_missing_shard_named_in_index(tmp_path):
    folder = save_model(tmp_path / "m", random_state(LLAMA_CONFIG, 1), LLAMA_CONFIG, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    assert "model-00002-of-00002.safetensors" in str(e.value) and "missing" in str(e.value)


def test_index_pointing_to_a_tensor_the_shard_lacks(tmp_path):
    folder = save_model(tmp_path / "m", random_state(LLAMA_CONFIG, 1), LLAMA_CONFIG, shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        Checkpoint.open(folder)


def test_pickles_refused_by_default_and_loaded_safely_when_allowed(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save({"w": torch.arange(4.0)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        Checkpoint.open(folder)
    ckpt = Checkpoint.open(folder, allow_pickle=True)
    assert ckpt.read("w").tolist() == [0, 1, 2, 3]
    assert ckpt.read("w", rows=(1, 3)).tolist() == [1, 2]


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        Checkpoint.open(folder, allow_pickle=True)
