"""Hub repo ids resolve through a populated huggingface_hub cache, offline."""

import pytest
import torch
from models import LLAMA_CONFIG, load_folder, perturb, random_state, save_model

import weightsmith
from weightsmith.errors import CheckpointError
from weightsmith.io.checkpoint import Checkpoint, looks_like_hub_id

SHA = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(cache, repo_id, state, sha=SHA):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    save_model(repo / "snapshots" / sha, state, LLAMA_CONFIG, shards=2)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return repo / "snapshots" / sha


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_ids_are_recognised():
    assert looks_like_hub_id("org/name") and looks_like_hub_id("org/name@v1.0")
    assert not looks_like_hub_id("./org/name") and not looks_like_hub_id("/abs/path")


def test_open_from_cache_by_id_and_revision(hub_cache):
    state = random_state(LLAMA_CONFIG, 3)
    populate_cache(hub_cache, "acme/base", state)
    ckpt = Checkpoint.open("acme/base")
    assert ckpt.revision == SHA
    assert torch.equal(ckpt.read("model.norm.weight"), state["model.norm.weight"])
    assert Checkpoint.open(f"acme/base@{SHA}").revision == SHA
    assert ckpt.provenance()["revision"] == SHA


def test_missing_from_cache_offline_is_a_clear_error(hub_cache):
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open("acme/absent")
    assert "acme/absent" in str(e.value) and "cache" in str(e.value)


def test_merge_with_hub_inputs_offline(hub_cache, tmp_path):
    base = random_state(LLAMA_CONFIG, 3)
    populate_cache(hub_cache, "acme/base", base)
    populate_cache(hub_cache, "acme/ft", perturb(base, 9))
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "acme/base",
        "models": [{"model": "acme/ft", "parameters": {"weight": 1.0}}],
    }
    weightsmith.merge(recipe, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "acme/base" in card and SHA in card and "base_model:" in card
    out = load_folder(tmp_path / "out")
    ft = perturb(base, 9)
    assert all(torch.equal(out[k], ft[k]) for k in out)


def populate_cache_with_blobs(cache, repo_id, state, sha=SHA):
    """The real cache layout: snapshot files are relative symlinks into the repo's blobs/."""
    import hashlib
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    staging = save_model(cache / "staging", state, LLAMA_CONFIG, shards=2)
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(staging.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.move(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(f"../../blobs/{digest}")
    staging.rmdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return snap


def test_snapshot_symlinks_into_the_repos_blobs_are_followed(hub_cache):
    state = random_state(LLAMA_CONFIG, 3)
    snap = populate_cache_with_blobs(hub_cache, "acme/blobs", state)
    assert (snap / "model-00001-of-00002.safetensors").is_symlink()
    ckpt = Checkpoint.open("acme/blobs")
    assert all(torch.equal(ckpt.read(k), v) for k, v in state.items())
    assert all("sha256" in s for s in ckpt.provenance()["shards"])


def test_snapshot_shard_linking_outside_its_repo_is_refused(hub_cache, tmp_path):
    state = random_state(LLAMA_CONFIG, 3)
    snap = populate_cache_with_blobs(hub_cache, "acme/evil", state)
    other = populate_cache_with_blobs(hub_cache, "acme/other", state)
    shard = snap / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to((other / shard.name).resolve())  # another repo's blob
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open("acme/evil")
    assert "outside" in str(e.value) and shard.name in str(e.value)
