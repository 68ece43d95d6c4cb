"""On a real CUDA device: the CUDA kernels (ops/cuda_fused.py) equal the CPU fused kernels bit
for bit on the gpu_sim cases, at the device launch shape too, on a side stream, and through
CuPy; and ``--device cuda`` merges through the device pipeline (streams, pinned slots, packs,
the device memory budget) with ``--kernels torch`` and ``--kernels cupy`` equal the CPU's
bytes. Skipped without a GPU (benchmarks/gpu/check.sh runs them where there is one)."""

import pytest
import torch
from gpu_cases import CASES, METHOD_CASES, assert_same, family, run_case

from weightsmith.ops import cuda_fused, fused

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

RANDOM = {name for name, (method, _, _) in METHOD_CASES.items() if method.startswith("dare")}


@pytest.fixture(scope="module", autouse=True)
def device_kernels():
    if cuda_fused.simulated() or not cuda_fused.available():
        pytest.skip("numba.cuda cannot reach the device (or runs the simulator)")
    cuda_fused.warm_up()
    yield


@pytest.fixture
def small_chunks(monkeypatch):
    from gpu_cases import CHUNK

    monkeypatch.setattr(cuda_fused, "LAUNCH", cuda_fused.Launch(chunk=CHUNK))


@pytest.mark.parametrize("case", [c for c in CASES if c not in RANDOM])
def test_device_kernels_equal_cpu_fused(small_chunks, case):
    assert_same(run_case(case, cuda_fused, "cuda"), run_case(case, fused, "cpu"), case)


@pytest.mark.parametrize("case", sorted(RANDOM))
def test_device_kernels_equal_the_torch_path_on_the_device(small_chunks, case):
    # DARE draws its mask from a CUDA generator here (a different stream from the CPU's), so
    # the reference is the torch path on the same device, with the same draws.
    got = run_case(case, cuda_fused, "cuda")
    ref = run_case(case, None, "cuda")
    assert torch.equal(got["out"].view(torch.int32), ref["out"].view(torch.int32))
    for key, value in ref["stats"].items():
        assert got["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-9), key


def test_device_launch_shape_on_a_big_tensor_equals_cpu_fused():
    # The default launch (8192 coordinates per block, 256 threads) on 2M coordinates.
    from gpu_cases import _host, run_method

    stacked, base = family(1 << 21, models=4)
    params = dict(weight=[0.3, 0.5, 0.2, 0.4], density=[0.2, 0.5, 1.0, 0.01])
    got = run_method(cuda_fused, "cuda", "ties", stacked, base, **params)
    ref = run_method(fused, "cpu", "ties", stacked, base, **params)
    assert_same(_host(got), _host(ref), "ties-2M")


def test_kernels_follow_the_stream_they_are_given():
    stacked, base = family(1 << 16)
    ref = stacked - base
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        models = stacked.cuda(non_blocking=True)
        cuda_fused.subtract_(models, base.cuda(non_blocking=True))  # on ``side``: after the copies
        host = models.to("cpu", non_blocking=False)
    torch.cuda.synchronize()
    assert torch.equal(host.view(torch.int32), ref.view(torch.int32))


def test_cupy_arrays_share_memory_with_the_kernels():
    cp = pytest.importorskip("cupy")
    stacked, base = family(4096)
    models = cp.asarray(stacked.numpy())
    as_torch = torch.as_tensor(models, device="cuda")  # zero copy through the array interface
    cuda_fused.subtract_(as_torch, base.cuda())
    torch.cuda.synchronize()
    written = torch.from_numpy(cp.asnumpy(models))
    assert torch.equal(written.view(torch.int32), (stacked - base).view(torch.int32))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_device_merge_writes_the_cpu_bytes(tmp_path, family, method):
    from models import load_folder

    from weightsmith.pipeline import merge

    base, models = family
    params = {"weight": 0.5, "density": 0.3} if method == "ties" else {"weight": 0.5}
    recipe = {
        "merge_method": method, "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(m), "parameters": params} for m in models],
    }
    merge(recipe, tmp_path / "cpu")
    merge(recipe, tmp_path / "gpu", device="cuda")
    cpu, gpu = load_folder(tmp_path / "cpu"), load_folder(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        a, b = cpu[name].reshape(-1).view(torch.uint8), gpu[name].reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), name


WIDE = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}  # MLP matrices of 32768 elements


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """Tensors big enough for the CUDA kernels (MIN_NUMEL), and small norms that get packed."""
    from models import LLAMA_CONFIG, make_family

    return make_family(tmp_path_factory.mktemp("wide"), config=dict(LLAMA_CONFIG, **WIDE))


def _recipe(method, base, models):
    params = {"weight": 0.5, "density": 0.3} if method.startswith("ties") else {"weight": 0.5}
    r = {
        "merge_method": method.removesuffix("_model"), "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(m), "parameters": params} for m in models],
    }
    if method == "ties_model":
        r["parameters"] = {"scope": "model"}
    return r


def _same_bytes(a, b):
    from models import load_folder

    ta, tb = load_folder(a), load_folder(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        a, b = ta[name].reshape(-1).view(torch.uint8), tb[name].reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kernels", ["torch", "cupy"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "ties_model"])
def test_device_pipeline_writes_the_cpu_bytes(tmp_path, wide_family, method, kernels, monkeypatch):
    from weightsmith.ops import cuda_fused, kernel_choice
    from weightsmith.pipeline import merge

    chosen = []
    real = kernel_choice.pick
    monkeypatch.setattr(kernel_choice, "pick", lambda *a: chosen.append(real(*a)) or chosen[-1])
    base, models = wide_family
    merge(_recipe(method, base, models), tmp_path / "cpu")
    chosen.clear()
    result = merge(_recipe(method, base, models), tmp_path / "gpu", device="cuda", kernels=kernels)
    _same_bytes(tmp_path / "cpu", tmp_path / "gpu")
    assert result.stats.device_slots >= 1 and result.stats.device_peak_bytes > 0
    if method.startswith("ties"):
        assert (cuda_fused in chosen) == (kernels == "cupy")
    else:
        assert result.stats.packs > 0  # the norms went in packed launches


def test_device_memory_budget_on_the_device(tmp_path, wide_family):
    from weightsmith.devices import check_device
    from weightsmith.engine.device import StagedCpu
    from weightsmith.engine.device_pipeline import DeviceSlots
    from weightsmith.engine.slots import SlotPool
    from weightsmith.pipeline import merge, plan_merge

    assert check_device("auto") == "cuda"
    base, models = wide_family
    r = _recipe("ties", base, models)
    plan = plan_merge(r)
    slots = DeviceSlots(StagedCpu(None), plan, plan.units, SlotPool(plan).capacity)
    budget = slots.slot_bytes + slots.scratch + 1
    result = merge(r, tmp_path / "gpu", device="cuda", kernels="cupy", device_memory_budget=budget)
    assert result.stats.device_slots == 1
    merge(r, tmp_path / "cpu")
    _same_bytes(tmp_path / "cpu", tmp_path / "gpu")
