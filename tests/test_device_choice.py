"""The device options as one value (engine/device_choice.py): built from the user's options
(devices.device_choice, RunOptions.device_choice), the resume fingerprint it feeds pinned to
what it was when the three options travelled apart, and the value reaching every shard task of
a distributed run (Ray's API run in this process, so no cluster is needed)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from models import load_folder, make_family

import weightsmith
from weightsmith import resume
from weightsmith.devices import device_choice
from weightsmith.engine import ray_executor, ray_shard, ray_stream
from weightsmith.engine.device_choice import CPU_STATISTICS, DeviceChoice
from weightsmith.errors import RecipeError
from weightsmith.run_options import RunOptions
from weightsmith.units import parse_size

# plan_fingerprint of the plan below, computed by the code before DeviceChoice (device and
# kernels passed apart): a --resume journal written then must still be resumable.
PINNED = {
    ("cpu", "torch"): "7a52ec20c6977176869d484c22a2759bc1b656b81dd9c3ead8279c82bc036141",
    ("cpu-staged", "cupy"): "7a52ec20c6977176869d484c22a2759bc1b656b81dd9c3ead8279c82bc036141",
    ("cuda", "torch"): "f5a2f30c2d65948b8b3654ad06e8c8640a3205b3fa5ecfaeaa36ad3a414814a0",
    ("cuda:1", "cupy"): "0e76adeb32f45973860191e79f8113846f19696efd58da26b5e4e2cca77623fb",
}


class FixedCheckpoint:
    def __init__(self, name):
        self.name = name

    def provenance(self):
        shard = {"file": "model.safetensors", "bytes": 1234, "sampled_fingerprint": "ab" * 32}
        return {"model": self.name, "path": f"/models/{self.name}", "revision": None, "shards": [shard]}


def fixed_plan():
    """What plan_fingerprint reads of a plan, with nothing that depends on this machine."""
    recipe = SimpleNamespace(to_yaml=lambda: "merge_method: linear\nmodels:\n- model: a\n- model: b\n",
                             numerics=None)
    return SimpleNamespace(
        recipe=recipe, method=SimpleNamespace(name="linear"), compute_dtype=torch.float32,
        tasks=["task(model.embed_tokens.weight)", "task(model.norm.weight)"],
        checkpoints=[FixedCheckpoint("a"), FixedCheckpoint("b")],
    )


@pytest.mark.parametrize(("device", "kernels"), list(PINNED))
def test_the_resume_fingerprint_is_the_one_written_before(monkeypatch, device, kernels):
    monkeypatch.setattr(resume, "__version__", "0.0.0+pinned")
    for budget in (None, 123, 8 << 30):  # the device memory budget changes no byte
        header = resume.plan_fingerprint(fixed_plan(), 5 << 30, DeviceChoice(device, kernels, budget))
        assert header["fingerprint"] == PINNED[device, kernels]
    assert set(header["parts"]["options"]) == {"out_shard_size", "device", "kernels", "weightsmith_version"}


def test_where_a_choice_computes():
    cpu, staged, gpu = DeviceChoice(), DeviceChoice("cpu-staged"), DeviceChoice("cuda:1", "cupy")
    assert (cpu.on_cpu, cpu.staged, cpu.on_gpu) == (True, False, False)
    assert (staged.on_cpu, staged.staged, staged.on_gpu) == (False, True, False)
    assert (gpu.on_cpu, gpu.staged, gpu.on_gpu) == (False, False, True)
    assert cpu == DeviceChoice("cpu", "torch", None)  # a value: equal options, equal choices
    with pytest.raises(AttributeError):
        cpu.device = "cuda"  # type: ignore[misc]


def test_the_users_options_become_one_checked_value():
    want = DeviceChoice("cpu-staged", "cupy", parse_size("64MB"))
    assert device_choice("cpu-staged", "cupy", "64MB") == want
    options = RunOptions(device="cpu-staged", kernels="cupy", device_memory_budget="64MB")
    assert options.device_choice() == want
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert RunOptions(device="auto").device_choice() == DeviceChoice(here, "torch", None)
    assert device_choice("cpu", budget=4096).memory_budget == 4096


def test_bad_device_options_are_refused_with_the_option_named():
    with pytest.raises(RecipeError, match="device memory budget"):
        RunOptions(device="cpu-staged", device_memory_budget="lots").device_choice()
    with pytest.raises(RecipeError, match="--kernels cupy runs on a GPU"):
        device_choice("cpu", "cupy")
    with pytest.raises(RecipeError, match="--device 'tpu'"):
        RunOptions(device="tpu").device_choice()


class Ref:
    def __init__(self, value):
        self.value = value


class InlineRay:
    """What execute_on_ray uses of Ray, run in this process: a task runs when it is started
    (its result behind a ``Ref``; a streaming task's generator is its own stream)."""

    def __init__(self):
        self.started = []  # (function name, positional args, keyword args)

    def is_initialized(self):
        return True

    def nodes(self):
        return []

    def put(self, value):
        return Ref(value)

    def get(self, ref):
        if isinstance(ref, list):
            return [self.get(r) for r in ref]
        return ref.value if isinstance(ref, Ref) else ref

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def remote(self, fn):
        ray = self

        class Task:
            def options(self, **_):
                return self

            def remote(self, *args, **kwargs):
                args = tuple(ray.get(a) for a in args)
                ray.started.append((fn.__name__, args, kwargs))
                result = fn(*args, **kwargs)
                return result if fn is ray_stream.merge_shard_streamed else Ref(result)

        return Task()


@pytest.mark.parametrize("shared_fs", [True, False])
def test_every_shard_task_gets_the_device_choice_and_writes_the_local_bytes(tmp_path, monkeypatch, shared_fs):
    base, models = make_family(tmp_path / "in", n_models=2, dtype=torch.float32)
    recipe = {
        "merge_method": "ties", "base_model": str(base), "dtype": "float32",
        "parameters": {"scope": "model"},  # model-wide statistics: reduced over the shard tasks
        "models": [{"model": str(m), "parameters": {"weight": 0.7, "density": 0.5}} for m in models],
    }
    options = {"memory_budget": "64KB", "out_shard_size": "20KB"}
    local = weightsmith.merge(recipe, tmp_path / "local", **options)
    ray = InlineRay()
    monkeypatch.setattr(ray_executor, "import_ray", lambda: ray)
    seen = []
    run_shard = ray_shard.run_shard

    def recording(*args, **kwargs):
        result = run_shard(*args, **kwargs)
        seen.append((kwargs["device_choice"], result[0].device_slots))
        return result

    monkeypatch.setattr(ray_shard, "run_shard", recording)
    monkeypatch.setattr(ray_stream, "run_shard", recording)
    on_ray = weightsmith.merge(recipe, tmp_path / "ray", executor="ray", ray_shared_fs=shared_fs,
                               device="cpu-staged", device_memory_budget="64MB", **options)
    want = DeviceChoice("cpu-staged", "torch", parse_size("64MB"))
    assert any(s[0] == "collect_shard" for s in ray.started)  # the statistics passes ran as tasks
    assert all(s[1][3] == CPU_STATISTICS for s in ray.started if s[0] == "collect_shard")
    tasks = [s for s in ray.started if s[0] != "collect_shard"]
    assert len(tasks) == len(seen) > 1  # several shards, each run through the device pipeline
    assert all(want in args for _, args, _ in tasks)
    assert all(choice == want and slots >= 1 for choice, slots in seen)
    got, expected = load_folder(Path(on_ray.out)), load_folder(Path(local.out))
    assert got.keys() == expected.keys()
    for name in got:
        a, b = got[name].reshape(-1), expected[name].reshape(-1)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


@pytest.mark.parametrize(("device", "passes_on"), [
    ("cpu", CPU_STATISTICS),  # the operators' default kernels, as before DeviceChoice
    ("cpu-staged", DeviceChoice("cpu", "cupy", 1 << 26)),  # the stage's compute device: the CPU
])
def test_the_statistics_passes_run_where_the_stage_computes(tmp_path, family, monkeypatch, device, passes_on):
    from weightsmith.engine import executor

    seen = []
    run_global_passes = executor.run_global_passes

    def recording(plan, pool, *, device_choice):
        seen.append(device_choice)
        return run_global_passes(plan, pool, device_choice=device_choice)

    monkeypatch.setattr(executor, "run_global_passes", recording)
    base, models = family
    recipe = {
        "merge_method": "ties", "base_model": str(base), "dtype": "float32",
        "parameters": {"scope": "model"},
        "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.3}} for m in models],
    }
    kernels = "torch" if device == "cpu" else "cupy"
    result = weightsmith.merge(recipe, tmp_path / "out", device=device, kernels=kernels,
                               device_memory_budget=1 << 26)
    assert seen == [passes_on]
    assert result.stats.global_passes > 0  # model-wide statistics: the passes did run


def test_plan_shows_the_device_choice_and_refuses_a_bad_budget_as_merge_does(tmp_path, family):
    import yaml
    from click.testing import CliRunner

    from weightsmith.cli import main

    base, models = family
    path = tmp_path / "r.yaml"
    listed = [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]
    path.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": listed}))
    runner = CliRunner()
    shown = runner.invoke(main, ["plan", str(path), "--device", "cpu-staged", "--kernels", "cupy",
                                 "--device-memory-budget", "64MB"])
    assert shown.exit_code == 0, shown.output
    line = next(li for li in shown.output.splitlines() if li.startswith("device:"))
    assert "cpu-staged (kernels: cupy)" in line and "4/5 of the free device memory" not in line
    # `plan` checks the device options as `merge` does, the budget on the CPU too.
    for command in (["plan", str(path)], ["merge", str(path), str(tmp_path / "out")]):
        refused = runner.invoke(main, [*command, "--device", "cpu", "--device-memory-budget", "lots"])
        assert refused.exit_code != 0 and "device memory budget" in refused.output, refused.output
    assert not (tmp_path / "out").exists()
