"""`--executor ray`: one Ray task per output shard on a local two-worker cluster, bytes identical
to the local executor (statistics passes reduced over the cluster included), a worker killed
mid-merge retried to the same output, and the partition `weightsmith plan` shows; with
--ray-no-shared-fs, the shards streamed back to the driver (same bytes, no task argument naming
OUT, a worker killed mid-stream retried, a killed local merge resumed streamed)."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from models import make_family

import weightsmith
from weightsmith.cli import main
from weightsmith.engine import ray_executor, ray_stream
from weightsmith.engine.ray_executor import _exact
from weightsmith.engine.ray_shard import DIE_ONCE_ENV
from weightsmith.engine.ray_stream import DIE_MID_STREAM_ENV, SPOOL_ENV, SPOOL_PREFIX
from weightsmith.errors import MergeError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.io.output_dir import TMP_MARK

ray = pytest.importorskip("ray")

# Timings differ between runs; every other file must match byte for byte.
TIMED = {"merge_report.json", "README.md"}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """One local cluster for the session: 127.0.0.1, two worker CPUs, no dashboard. Workers
    inherit this environment, so the die-once marker paths (the mid-stream one beside the
    first) and the spool folder of --ray-no-shared-fs are set before they start."""
    marker = tmp_path_factory.mktemp("ray") / "die-once"
    spool = tmp_path_factory.mktemp("spool")
    env = {DIE_ONCE_ENV: str(marker), DIE_MID_STREAM_ENV: str(marker.parent / "die-mid-stream"),
           SPOOL_ENV: str(spool)}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield marker
    ray.shutdown()
    for name in env:
        os.environ.pop(name, None)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_same_output(got, want, resumed=False):
    got_files, want_files = files(got), files(want)
    assert sorted(got_files) == sorted(want_files)
    for name in got_files:
        if name not in TIMED:
            assert got_files[name] == want_files[name], name
    strip = ("seconds", "stage_seconds", "name")  # name: the output folder's
    reports = [json.loads(f["merge_report.json"]) for f in (got_files, want_files)]
    if resumed:  # the resumed run's report says what it kept, and wrote only the rest
        kept = reports[0].pop("resumed")["reused_bytes"]
        assert kept > 0 and reports[0].pop("bytes_written") == reports[1].pop("bytes_written") - kept
    for report in reports:
        for key in strip:
            report.pop(key, None)
    assert reports[0] == reports[1]  # per-tensor statistics, passes and summary included


def merge_both(recipe, tmp_path, ray_options=(), **options):
    local = weightsmith.merge(recipe, tmp_path / "local", **options)
    on_ray = weightsmith.merge(recipe, tmp_path / "ray", executor="ray", **dict(ray_options), **options)
    assert len({s for s in json.loads((tmp_path / "ray" / "model.safetensors.index.json").read_text())
                ["weight_map"].values()}) > 1  # several shards, so several tasks
    assert_same_output(tmp_path / "ray", tmp_path / "local")
    return local, on_ray


@pytest.fixture
def inputs(tmp_path):
    return make_family(tmp_path / "in", n_models=2, dtype=torch.float32)


def recipe(method, base, models, **parameters):
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.7}} for m in models],
        "parameters": parameters,
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


@pytest.mark.slow
def test_linear_merge_in_row_blocks_matches_the_local_executor(cluster, inputs, tmp_path):
    base, models = inputs
    merge_both(recipe("task_arithmetic", base, models), tmp_path, memory_budget="64KB",
               out_shard_size="20KB")


@pytest.mark.slow
def test_model_wide_statistics_are_reduced_over_the_cluster(cluster, inputs, tmp_path):
    # LiNeS over TIES scope: model: radix-selection passes (integer histograms, reduced on the
    # workers), a sign pass, then the L1 pass (float partials, summed on the driver in plan order).
    base, models = inputs
    lines = recipe("lines", base, models, merge="ties", density=0.3, scope="model", beta=0.5)
    local, on_ray = merge_both(lines, tmp_path, memory_budget="64KB", out_shard_size="20KB")
    assert on_ray.stats.global_passes == local.stats.global_passes >= 3
    assert on_ray.stats.context.auto_alpha == local.stats.context.auto_alpha


@pytest.mark.slow
def test_per_tensor_statistics_run_inside_each_shard_task(cluster, inputs, tmp_path):
    # TIES per tensor at a budget too small for whole tensors: thresholds from per-tensor passes.
    base, models = inputs
    local, on_ray = merge_both(recipe("ties", base, models, density=0.3), tmp_path,
                               memory_budget="24KB", out_shard_size="20KB")
    assert on_ray.stats.global_passes == local.stats.global_passes > 0


@pytest.mark.slow
def test_a_worker_killed_mid_merge_is_retried_to_the_same_bytes(cluster, inputs, tmp_path):
    base, models = inputs
    cluster.write_text("")  # the first worker to write a block removes it and dies
    merge_both(recipe("task_arithmetic", base, models), tmp_path, memory_budget="64KB",
               out_shard_size="20KB")
    assert not cluster.exists()  # a worker did die (and its task was run again)


@pytest.mark.slow
def test_a_budget_no_node_offers_is_refused_not_left_waiting(cluster, inputs, tmp_path):
    base, models = inputs
    with pytest.raises(MergeError, match="more than any Ray node offers"):
        weightsmith.merge(recipe("task_arithmetic", base, models), tmp_path / "out", executor="ray",
                          memory_budget="100TB")
    assert not (tmp_path / "out").exists()


def task_arguments(monkeypatch):
    """Every argument of every shard task started, pickled (the plan fetched from its ref)."""
    seen = []
    launch = ray_executor._launch

    def recording(task, args, kwargs):
        values = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
        seen.append(ray.cloudpickle.dumps((values, kwargs)))
        return launch(task, args, kwargs)

    monkeypatch.setattr(ray_executor, "_launch", recording)
    return seen


def spool_of(cluster):
    """The spool folders left on the (one) node: none once every stream has ended."""
    return [p.name for p in Path(os.environ[SPOOL_ENV]).glob(f"{SPOOL_PREFIX}*")]


@pytest.mark.slow
def test_no_shared_fs_streams_the_shards_back_bit_identical(cluster, inputs, tmp_path, monkeypatch):
    base, models = inputs
    lines = recipe("lines", base, models, merge="ties", density=0.3, scope="model", beta=0.5)
    options = {"memory_budget": "64KB", "out_shard_size": "20KB"}
    weightsmith.merge(lines, tmp_path / "local", **options)
    arguments = task_arguments(monkeypatch)
    weightsmith.merge(lines, tmp_path / "shared", executor="ray", **options)
    shared = list(arguments)
    monkeypatch.setattr(ray_stream, "CHUNK_BYTES", 4096)
    chunks = []
    write_chunk = ray_stream.write_chunk
    monkeypatch.setattr(ray_stream, "write_chunk", lambda w, s, c: (chunks.append(c), write_chunk(w, s, c)))
    arguments.clear()
    weightsmith.merge(lines, tmp_path / "streamed", executor="ray", ray_shared_fs=False, **options)
    assert_same_output(tmp_path / "streamed", tmp_path / "local")
    assert_same_output(tmp_path / "shared", tmp_path / "local")
    # No task argument names the output: not OUT, not its temporary sibling. (The same check
    # finds the temporary folder in every shared-filesystem task, so it can fail.)
    assert len(arguments) == len(shared) > 1
    assert all(TMP_MARK.encode() in blob for blob in shared)
    for blob in arguments:
        assert TMP_MARK.encode() not in blob and str(tmp_path / "streamed").encode() not in blob
    # Every shard's bytes came back in chunks of at most 4 KiB, each written once.
    shards = sorted((tmp_path / "streamed").glob("model-*.safetensors"))
    assert max(len(c.data) for c in chunks) == 4096
    assert sum(len(c.data) for c in chunks) == sum(p.stat().st_size for p in shards)
    assert not spool_of(cluster)  # the workers removed their node-local files


@pytest.mark.slow
def test_a_worker_killed_mid_stream_is_retried_to_the_same_bytes(cluster, inputs, tmp_path):
    base, models = inputs
    marker = cluster.parent / "die-mid-stream"
    marker.write_text("")  # the first worker to send a chunk removes it and dies
    merge_both(recipe("task_arithmetic", base, models), tmp_path, memory_budget="64KB",
               out_shard_size="20KB", ray_options={"ray_shared_fs": False})
    assert not marker.exists()  # a worker did die mid-stream (and its task was run again)
    assert not spool_of(cluster)  # its spool folder was swept by the next task


@pytest.mark.slow
def test_a_killed_local_merge_resumes_streamed_on_ray(cluster, inputs, tmp_path, capfd):
    # The blocks the killed run left are kept on the driver and neither recomputed nor streamed.
    from test_resume import killed_merge

    base, models = inputs
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe("task_arithmetic", base, models)))
    options = {"memory_budget": "64KB", "out_shard_size": "20KB"}
    weightsmith.merge(str(path), tmp_path / "local", **options)
    out = tmp_path / "run" / "local"  # the same folder name: the report carries it
    out.parent.mkdir()
    killed_merge(path, out, 5, "--memory-budget", "64KB", "--out-shard-size", "20KB")
    capfd.readouterr()
    result = weightsmith.merge(str(path), out, resume=True, executor="ray", ray_shared_fs=False, **options)
    assert "resume: 5 written blocks check out" in capfd.readouterr().err
    assert result.stats.reused_blocks == 5
    assert_same_output(out, tmp_path / "local", resumed=True)


def test_plan_shows_the_partition_by_shard(inputs, tmp_path):
    base, models = inputs
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe("task_arithmetic", base, models)))
    args = ["plan", str(path), "--executor", "ray", "--out-shard-size", "20KB"]
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0, text.output
    assert "ray partition:" in text.output and "task 1: model-00002-of-" in text.output
    got = CliRunner().invoke(main, [*args, "--json"])
    summary = json.loads(got.output)["summary"]
    tasks = summary["ray_partition"]
    assert len(tasks) > 1
    assert sum(t["bytes_to_write"] for t in tasks) == summary["bytes_to_write"]
    assert sum(t["bytes_to_read"] for t in tasks) == summary["bytes_to_read"]


def test_plan_says_the_shards_come_back_streamed_without_shared_fs(inputs, tmp_path):
    base, models = inputs
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe("task_arithmetic", base, models)))
    args = ["plan", str(path), "--executor", "ray", "--out-shard-size", "20KB", "--ray-no-shared-fs"]
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0, text.output
    assert "shards come back streamed" in text.output and "through Ray's object store" in text.output
    assert "streams " in text.output.split("task 1:")[1].splitlines()[0]
    summary = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)["summary"]
    assert summary["ray_shared_fs"] is False
    assert sum(t["bytes_streamed"] for t in summary["ray_partition"]) == summary["bytes_to_write"]
    shared = json.loads(CliRunner().invoke(main, args[:-1] + ["--json"]).output)["summary"]
    assert shared["ray_shared_fs"] is True and {t["bytes_streamed"] for t in shared["ray_partition"]} == {0}
    local = CliRunner().invoke(main, ["plan", str(path), "--ray-no-shared-fs"])
    assert local.exit_code != 0 and "applies to --executor ray only" in local.output


def test_checkpoints_pickle_by_reference_and_reopen(inputs, tmp_path, monkeypatch):
    base, _ = inputs
    monkeypatch.chdir(base.parent)
    ckpt = Checkpoint.open(base.name)  # a relative path: must survive another working folder
    key = ckpt.keys()[0]
    want = ckpt.read(key)
    copy = pickle.loads(pickle.dumps(ckpt))
    monkeypatch.chdir(tmp_path)
    assert copy._fds == {} and torch.equal(copy.read(key), want)


def test_only_integer_partials_count_as_order_free():
    assert _exact([torch.zeros(3, dtype=torch.int64), None, 5])
    assert not _exact([torch.zeros(3, dtype=torch.int64), 0.5])
    assert not _exact({"a": torch.zeros(2)})

