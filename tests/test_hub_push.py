"""Publishing to the Hub, driven through the real huggingface_hub client against a loopback stand-in.

No test here reaches the network: the client is pointed at tests/hub_standin.py on 127.0.0.1
(HF_ENDPOINT), Xet is off (its uploads bypass the Python HTTP stack), and any socket connect to
a non-loopback address fails the test.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hub_standin import FakeHub
from models import LLAMA_CONFIG, make_family, perturb, random_state, save_model

import weightsmith
from weightsmith.cli import main
from weightsmith.errors import CheckpointError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.io.hub import redact_token
from weightsmith.io.hub_push import PushError, collect_output_files, push_to_hub, resume_command
from weightsmith.io.model_card import read_front_matter

TOKEN = "hf_weightsmithTestToken0123456789abcd"
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def loopback_only(monkeypatch):
    """Fail any connection to a host other than 127.0.0.1 / ::1."""
    real_connect = socket.socket.connect

    def connect(self, address):  # noqa: ANN001, ANN202 - mirrors socket.connect
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"a test tried to reach {address}: only 127.0.0.1 is allowed")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def hub(monkeypatch, tmp_path, loopback_only):
    """The stand-in Hub, with huggingface_hub pointed at it and logged in through HF_TOKEN."""
    import huggingface_hub.constants as c

    fake = FakeHub(token=TOKEN)
    endpoint = fake.start()
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(c, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # a developer's own login token must neither be used nor matter
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    yield fake
    fake.stop()
    assert all(host.startswith("127.0.0.1:") for _, _, host in fake.requests)


@pytest.fixture
def merged(tmp_path):
    """A finished 3-shard merge output (tiny Llama, task arithmetic of two fine-tunes)."""
    base, models = make_family(tmp_path / "in", n_models=2)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
    }
    out = tmp_path / "merged"
    weightsmith.merge(recipe, out, out_shard_size="24KB")
    assert len(list(out.glob("*.safetensors"))) >= 2
    return out


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def fingerprint(folder: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in folder_bytes(folder).items()}


def count(hub: FakeHub, method: str, fragment: str) -> int:
    return sum(1 for m, path, _ in hub.requests if m == method and fragment in path)


# ---------------------------------------------------------------------------- pushing
def test_push_commits_exactly_the_output_folder(hub, merged):
    result = push_to_hub(merged, "acme/merged")
    assert [c.repo_id for c in hub.commits] == ["acme/merged"]
    commit = hub.commits[0]
    assert commit.files == folder_bytes(merged)  # every file, byte for byte, in one commit
    shards = sorted(p.name for p in merged.glob("*.safetensors"))
    assert sorted(commit.lfs_paths) == shards  # shards through LFS, the rest inline
    assert count(hub, "PUT", "/_lfs/") == len(shards)
    assert count(hub, "POST", "/preupload/") == len(shards) + 1  # one per shard, then the rest
    assert "task_arithmetic" in commit.summary and commit.revision == "main"
    assert hub.repos["acme/merged"].branches["main"]["README.md"] == (merged / "README.md").read_bytes()
    assert not hub.repos["acme/merged"].private
    assert hub.auth_headers == {f"Bearer {TOKEN}"}  # the standard token source (HF_TOKEN) was used
    assert result.commit_oid == commit.oid and result.revision == "main" and result.pr_url is None
    assert result.bytes == sum(len(b) for b in commit.files.values())
    for name in ("model.safetensors.index.json", "config.json", "tokenizer_config.json", "README.md"):
        assert name in result.files


def test_transient_failures_are_retried(hub, merged):
    hub.fail("POST", r"^/api/repos/create$", status=503)
    hub.fail("POST", r"/commit/", status=None)  # connection dropped without an answer
    hub.fail("POST", r"/commit/", status=502)
    messages: list[str] = []
    result = push_to_hub(merged, "acme/retry", backoff_s=0, log=messages.append)
    assert count(hub, "POST", "/api/repos/create") == 2
    assert count(hub, "POST", "/commit/") == 3
    assert len(hub.commits) == 1 and hub.commits[0].files == folder_bytes(merged)
    assert result.commit_oid == hub.commits[0].oid
    retries = [m for m in messages if "retrying" in m]
    assert len(retries) == 3 and any("503" in m for m in retries)


def test_failed_push_leaves_output_intact_and_says_how_to_resume(hub, merged):
    before = fingerprint(merged)
    hub.fail("POST", r"/commit/", status=503, times=3)
    with pytest.raises(PushError) as e:
        push_to_hub(merged, "acme/flaky", revision="dev", attempts=3, backoff_s=0)
    command = resume_command(merged, "acme/flaky", revision="dev")
    assert command in str(e.value) and "intact" in str(e.value) and "503" in str(e.value)
    assert fingerprint(merged) == before and not hub.commits
    puts = count(hub, "PUT", "/_lfs/")
    # resuming commits everything; shards the Hub already holds are not sent again
    push_to_hub(merged, "acme/flaky", revision="dev")
    assert count(hub, "PUT", "/_lfs/") == puts
    assert hub.commits[0].files == folder_bytes(merged) and hub.commits[0].revision == "dev"


def test_non_transient_errors_are_not_retried(hub, merged):
    hub.fail("POST", r"/commit/", status=403, times=5)
    with pytest.raises(PushError) as e:
        push_to_hub(merged, "acme/denied", backoff_s=0)
    assert count(hub, "POST", "/commit/") == 1
    assert "write access" in str(e.value) and "weightsmith push" in str(e.value)


def test_private_repo_on_a_new_branch(hub, merged):
    push_to_hub(merged, "acme/secret", private=True, revision="dev")
    repo = hub.repos["acme/secret"]
    assert repo.private
    assert set(repo.branches["main"]) == {".gitattributes"}  # main untouched
    assert {k: v for k, v in repo.branches["dev"].items() if k != ".gitattributes"} == folder_bytes(merged)
    assert hub.commits[0].revision == "dev"


def test_private_refuses_an_existing_public_repo(hub, merged):
    hub.create("acme/public")
    with pytest.raises(PushError) as e:
        push_to_hub(merged, "acme/public", private=True)
    assert "public" in str(e.value) and not hub.commits


def test_create_pr_leaves_main_alone(hub, merged):
    hub.create("acme/shared")
    result = push_to_hub(merged, "acme/shared", create_pr=True, commit_message="Proposed merge")
    repo = hub.repos["acme/shared"]
    assert set(repo.branches["main"]) == {".gitattributes"}
    assert repo.prs == ["refs/pr/1"] and hub.commits[0].pr == 1
    assert hub.commits[0].summary == "Proposed merge"
    assert result.pr_url and result.pr_url.endswith("/discussions/1")


def test_pushing_again_is_a_no_op(hub, merged):
    first = push_to_hub(merged, "acme/again")
    second = push_to_hub(merged, "acme/again")
    assert len(hub.commits) == 1 and second.commit_oid == first.commit_oid


def test_eval_results_added_after_the_merge_reach_the_hub_card(hub, merged):
    (merged / "eval_results.json").write_text(json.dumps({"accuracy": 0.875, "loss": 0.41, "examples": 64}))
    push_to_hub(merged, "acme/evaluated")
    card = hub.repos["acme/evaluated"].branches["main"]["README.md"].decode()
    assert card == (merged / "README.md").read_text()  # refreshed locally, then uploaded
    assert "## Evaluation" in card and "| accuracy | loss | examples |" in card and "0.8750" in card
    assert read_front_matter(card)["tags"] == ["merge", "weightsmith", "task_arithmetic"]


# ---------------------------------------------------------------------------- refusing incomplete folders
@pytest.mark.parametrize(
    "damage, message",
    [
        ("delete_shard", "not there"),
        ("delete_index", "no *.safetensors.index.json"),
        ("stray_shard", "not listed in"),
        ("truncate_shard", "truncated"),
        ("delete_config", "config.json is missing"),
    ],
)
def test_refuses_an_incomplete_output(hub, merged, damage, message):
    shard = sorted(merged.glob("model-*.safetensors"))[-1]
    if damage == "delete_shard":
        shard.unlink()
    elif damage == "delete_index":
        (merged / "model.safetensors.index.json").unlink()
    elif damage == "stray_shard":
        (merged / "model-00009-of-00009.safetensors").write_bytes(shard.read_bytes())
    elif damage == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "delete_config":
        (merged / "config.json").unlink()
    with pytest.raises(PushError) as e:
        push_to_hub(merged, "acme/broken")
    assert message in str(e.value)
    assert hub.requests == []  # refused before any request


def test_hidden_files_are_not_published(merged):
    (merged / ".cache").mkdir()
    (merged / ".cache" / "state").write_text("x")
    (merged / ".DS_Store").write_text("x")
    names = [rel for rel, _ in collect_output_files(merged)]
    assert not any(n.startswith(".") for n in names) and "config.json" in names


def test_offline_mode_refuses_with_the_resume_command(merged, monkeypatch):
    with pytest.raises(PushError) as e:
        push_to_hub(merged, "acme/offline")  # conftest keeps HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE" in str(e.value) and "weightsmith push" in str(e.value)


# ---------------------------------------------------------------------------- command line
def test_cli_push_with_options(hub, merged):
    result = CliRunner().invoke(
        main, ["push", str(merged), "acme/cli", "--private", "--revision", "v1", "--message", "hello"]
    )
    assert result.exit_code == 0, result.output
    assert "acme/cli" in result.output
    commit = hub.commits[0]
    assert commit.summary == "hello" and commit.revision == "v1" and hub.repos["acme/cli"].private
    assert commit.files == folder_bytes(merged)


def linear_recipe(tmp_path: Path) -> Path:
    _, models = make_family(tmp_path / "in", n_models=2)
    recipe = tmp_path / "recipe.yaml"
    models = [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    return recipe


def test_cli_merge_push_to(hub, tmp_path):
    recipe = linear_recipe(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(recipe), str(out), "-q", "--push-to", "acme/linear"])
    assert result.exit_code == 0, result.output
    assert hub.commits[0].files == folder_bytes(out)


def test_cli_merge_push_to_fails_before_merging_when_offline(tmp_path):
    recipe = linear_recipe(tmp_path)
    result = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "out"), "--push-to", "acme/x"])
    assert result.exit_code != 0 and "HF_HUB_OFFLINE" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_failed_push_exit_code_and_message(hub, merged):
    hub.fail("POST", r"/commit/", status=404, times=1)
    result = CliRunner().invoke(main, ["push", str(merged), "acme/gone"])
    assert result.exit_code == PushError.exit_code
    assert "error:" in result.output and f"weightsmith push {merged} acme/gone" in result.output


# ---------------------------------------------------------------------------- tokens never leak
def populate_cache(cache: Path, repo_id: str, state: dict, readme: str | None = None) -> Path:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = save_model(repo / "snapshots" / SHA, state, LLAMA_CONFIG, shards=2)
    if readme is not None:
        (snap / "README.md").write_text(readme)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def test_token_never_appears_in_outputs_logs_or_errors(hub, hub_cache, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    base = random_state(LLAMA_CONFIG, 3)
    populate_cache(hub_cache, "acme/base", base, readme="---\nlicense: mit\n---\n# base\n")
    populate_cache(hub_cache, "acme/ft", perturb(base, 9))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": "acme/base",
                "models": [{"model": "acme/ft", "parameters": {"weight": 1.0}}],
            }
        )
    )
    out = tmp_path / "out"
    # inputs come from the cache offline; the push goes to the stand-in
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    weightsmith.merge(recipe, out)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    runner = CliRunner()
    ok = runner.invoke(main, ["push", str(out), "acme/merged"])
    assert ok.exit_code == 0, ok.output
    outputs = [ok.output]
    # a token the Hub rejects, and an error message that (as some proxies do) echoes it back
    monkeypatch.setenv("HF_TOKEN", TOKEN[::-1])
    denied = runner.invoke(main, ["push", str(out), "acme/other"])
    assert denied.exit_code == PushError.exit_code and "hf auth login" in denied.output
    outputs.append(denied.output)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open("acme/not-cached")
    outputs.append(str(e.value))
    outputs.append(redact_token(f"proxy said: bad header Bearer {TOKEN[::-1]}"))
    for text in outputs:
        assert TOKEN not in text and TOKEN[::-1] not in text
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert TOKEN.encode() not in data and TOKEN[::-1].encode() not in data, path
    for commit in hub.commits:
        assert all(TOKEN.encode() not in data for data in commit.files.values())
    assert read_front_matter((out / "README.md").read_text())["license"] == "mit"


# ---------------------------------------------------------------------------- Hub inputs, offline
def test_offline_missing_shard_in_cached_snapshot_is_named(hub_cache):
    snap = populate_cache(hub_cache, "acme/partial", random_state(LLAMA_CONFIG, 1))
    (snap / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open("acme/partial")
    text = str(e.value)
    assert "model-00002-of-00002.safetensors" in text and "acme/partial" in text and "network" in text


def test_offline_uncached_repo_names_the_cache_entry(hub_cache):
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open("acme/absent@v2")
    text = str(e.value)
    assert str(hub_cache / "models--acme--absent" / "refs" / "v2") in text
    assert "HF_HUB_OFFLINE" in text and "hf download acme/absent --revision v2" in text
