"""The device pipeline (engine/device_pipeline.py) on the ``cpu-staged`` fake device: worker
threads stand in for the CUDA streams, so the order of copy in / compute / copy out per unit,
the device memory bound, the packing of small tensors and the outputs are checked without a GPU.
(tests/test_gpu.py runs the same merges on a real device.)"""

import json

import pytest
import torch
from models import load_folder

from weightsmith.devices import check_device
from weightsmith.engine import batching
from weightsmith.engine.device import StagedCpu
from weightsmith.engine.device_pipeline import DeviceSlots
from weightsmith.errors import MergeError, RecipeError
from weightsmith.pipeline import merge, plan_merge

PARAMS = {
    "task_arithmetic": {"weight": 0.5},
    "linear": {"weight": 0.4},
    "ties": {"weight": 0.5, "density": 0.3},
}


def recipe(method, base, models, **extra):
    r = {
        "merge_method": method, "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(m), "parameters": PARAMS[method]} for m in models],
    }
    if method == "linear":
        r.pop("base_model")
    r.update(extra)
    return r


def same_bytes(a, b):
    ta, tb = load_folder(a), load_folder(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        a, b = ta[name].reshape(-1).view(torch.uint8), tb[name].reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties"])
def test_staged_device_writes_the_cpu_bytes_and_report(tmp_path, family, method):
    base, models = family
    r = recipe(method, base, models)
    merge(r, tmp_path / "cpu")
    staged = merge(r, tmp_path / "staged", device="cpu-staged")
    same_bytes(tmp_path / "cpu", tmp_path / "staged")
    report = [json.loads((tmp_path / d / "merge_report.json").read_text()) for d in ("cpu", "staged")]
    assert report[0].get("tensors") == report[1].get("tensors")
    assert report[0].get("summary") == report[1].get("summary")
    assert staged.stats.device_slots >= 1
    assert staged.stats.tensors == len(staged.plan.tasks)


def _positions(log):
    return {(stage, unit, what): i for i, (stage, unit, what) in enumerate(log)}


def test_each_unit_is_copied_in_then_computed_then_copied_out(tmp_path, family):
    base, models = family
    result = merge(recipe("ties", base, models), tmp_path / "out", device="cpu-staged")
    log = result.stats.device_log
    at = _positions(log)
    units = sorted({u for _, u, _ in log})
    assert len(units) == len(result.plan.units)  # ties packs nothing: one item per unit
    for u in units:
        assert at["h2d", u, "end"] < at["compute", u, "start"]
        assert at["compute", u, "end"] < at["d2h", u, "start"]
        assert at["d2h", u, "start"] < at["d2h", u, "end"]
    for stage in ("h2d", "compute", "d2h"):  # each stream runs its work in unit order
        starts = [u for s, u, w in log if s == stage and w == "start"]
        assert starts == units


def test_device_memory_stays_under_the_budget_with_fewer_slots(tmp_path, family):
    base, models = family
    r = recipe("ties", base, models)
    plan = plan_merge(r)
    from weightsmith.engine.slots import SlotPool

    slots = DeviceSlots(StagedCpu(None), plan, plan.units, SlotPool(plan).capacity)
    assert slots.count == 3  # unlimited fake
    budget = slots.slot_bytes + slots.scratch + 1  # room for one slot and one unit's scratch only
    result = merge(r, tmp_path / "one", device="cpu-staged", device_memory_budget=budget)
    assert result.stats.device_slots == 1
    assert 0 < result.stats.device_peak_bytes <= budget
    merge(r, tmp_path / "cpu")
    same_bytes(tmp_path / "cpu", tmp_path / "one")
    with pytest.raises(MergeError, match="--device-memory-budget"):
        merge(r, tmp_path / "none", device="cpu-staged", device_memory_budget=slots.slot_bytes // 2)


def test_small_tensors_are_packed_into_few_launches_with_the_unpacked_bytes(tmp_path, family, monkeypatch):
    base, models = family
    r = recipe("linear", base, models)
    packed = merge(r, tmp_path / "packed", device="cpu-staged")
    computes = sum(1 for s, _, w in packed.stats.device_log if s == "compute" and w == "start")
    assert packed.stats.packed_units > 1
    assert computes < len(packed.plan.units)  # many small tensors, few launches
    monkeypatch.setattr(batching, "SMALL_NUMEL", 0)
    unpacked = merge(r, tmp_path / "unpacked", device="cpu-staged")
    assert unpacked.stats.packs == 0
    assert sum(1 for s, _, w in unpacked.stats.device_log if s == "compute" and w == "start") == len(
        unpacked.plan.units
    )
    same_bytes(tmp_path / "packed", tmp_path / "unpacked")


def test_packs_never_mix_parameters_and_fit_the_slot(family):
    base, models = family
    r = recipe("linear", base, models)
    r["models"][0]["parameters"] = {"weight": [{"filter": "norm", "value": 0.9}, {"value": 0.5}]}
    plan = plan_merge(r)
    capacity = 200
    items = batching.pack_units(plan, plan.units, capacity)
    packs = [i for i in items if isinstance(i, batching.Pack)]
    assert packs
    for pack in packs:
        assert pack.numel <= capacity
        assert len({repr(u.task.params) for u in pack.units}) == 1
    covered = [u for i in items for u in (i.units if isinstance(i, batching.Pack) else [i])]
    assert sorted(id(u) for u in covered) == sorted(id(u) for u in plan.units)


def test_nan_in_a_packed_tensor_names_that_tensor(tmp_path, family):
    from safetensors.torch import load_file, save_file

    base, models = family
    shard = sorted(models[1].glob("*.safetensors"))[0]
    state = load_file(str(shard))
    name = next(k for k in state if "norm" in k)
    state[name][0] = float("nan")
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(MergeError, match=name.replace(".", r"\.")):
        merge(recipe("linear", base, models), tmp_path / "out", device="cpu-staged")


def test_the_kernel_choice_reaches_the_operator(tmp_path, family, monkeypatch):
    from weightsmith.ops import kernel_choice

    seen = []
    real = kernel_choice.pick

    def spy(models, kernels, cpu_kernels):
        seen.append(kernels)
        return real(models, kernels, cpu_kernels)

    monkeypatch.setattr(kernel_choice, "pick", spy)
    base, models = family
    merge(recipe("ties", base, models), tmp_path / "cupy", device="cpu-staged", kernels="cupy")
    assert seen and set(seen) == {"cupy"}
    seen.clear()
    merge(recipe("ties", base, models), tmp_path / "cpu")
    assert seen and set(seen) == {"auto"}  # the CPU path is untouched


def test_device_choice_is_checked_before_any_work():
    assert check_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert check_device("cpu-staged", "cupy") == "cpu-staged"
    with pytest.raises(RecipeError, match="--kernels cupy runs on a GPU"):
        check_device("cpu", "cupy")
    with pytest.raises(RecipeError, match="expected one of"):
        check_device("cpu", "numpy")
    with pytest.raises(RecipeError, match="expected cpu, cuda"):
        check_device("tpu")


def test_plan_and_merge_commands_take_the_device_options(tmp_path, family):
    import yaml
    from click.testing import CliRunner

    from weightsmith.cli import main

    base, models = family
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe("linear", base, models)))
    runner = CliRunner()
    shown = runner.invoke(main, ["plan", str(path), "--device", "cpu-staged", "--json"])
    assert shown.exit_code == 0, shown.output
    device = json.loads(shown.output)["summary"]["device"]
    assert device["device"] == "cpu-staged" and device["kernels"] == "torch"
    assert device["packed_tensors"] > device["packed_launches"] > 0
    done = runner.invoke(main, ["merge", str(path), str(tmp_path / "out"), "--device", "cpu-staged",
                                "--device-memory-budget", "64MB"])
    assert done.exit_code == 0, done.output
    assert "device: 3 slots" in done.output and "packed launches" in done.output
    refused = runner.invoke(main, ["merge", str(path), str(tmp_path / "no"), "--kernels", "cupy"])
    assert refused.exit_code != 0 and "--device cuda" in refused.output
