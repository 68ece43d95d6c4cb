"""`--executor ray`: one Ray task per output shard on a local two-worker cluster, bytes identical
to the local executor (statistics passes reduced over the cluster included), a worker killed
mid-merge retried to the same output, and the partition `weightsmith plan` shows."""

import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner
from models import make_family

import weightsmith
from weightsmith.cli import main
from weightsmith.engine.ray_executor import DIE_ONCE_ENV, _exact
from weightsmith.errors import MergeError
from weightsmith.io.checkpoint import Checkpoint

ray = pytest.importorskip("ray")

# Timings differ between runs; every other file must match byte for byte.
TIMED = {"merge_report.json", "README.md"}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """One local cluster for the session: 127.0.0.1, two worker CPUs, no dashboard. Workers
    inherit this environment, so the die-once marker path is set before they start."""
    marker = tmp_path_factory.mktemp("ray") / "die-once"
    os.environ[DIE_ONCE_ENV] = str(marker)
    ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield marker
    ray.shutdown()
    os.environ.pop(DIE_ONCE_ENV, None)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_same_output(got, want):
    got_files, want_files = files(got), files(want)
    assert sorted(got_files) == sorted(want_files)
    for name in got_files:
        if name not in TIMED:
            assert got_files[name] == want_files[name], name
    strip = ("seconds", "stage_seconds", "name")  # name: the output folder's
    reports = [json.loads(f["merge_report.json"]) for f in (got_files, want_files)]
    for report in reports:
        for key in strip:
            report.pop(key, None)
    assert reports[0] == reports[1]  # per-tensor statistics, passes and summary included


def merge_both(recipe, tmp_path, **options):
    local = weightsmith.merge(recipe, tmp_path / "local", **options)
    on_ray = weightsmith.merge(recipe, tmp_path / "ray", executor="ray", **options)
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

