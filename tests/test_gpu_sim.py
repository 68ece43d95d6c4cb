"""The CUDA kernels (ops/_cuda_kernels.py) under numba's CUDA simulator give the CPU fused
kernels' results bit for bit (outputs, task vectors, histograms, counts; the report's float64
sums to rounding).

The simulator must be chosen before numba.cuda is first imported, and once chosen it holds for
the process; so the kernels run in one subprocess with ``NUMBA_ENABLE_CUDASIM=1`` (all cases
at once: the simulator is Python per CUDA thread), and this process, whose CPU fused kernels
stay untouched, computes the references and compares.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gpu_cases import CASES, assert_same, run_case

from weightsmith.ops import fused

pytestmark = [
    pytest.mark.gpu_sim,
    pytest.mark.skipif(not fused.available(), reason="numba not importable"),
]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_sim") / "results.pt"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", WEIGHTSMITH_CUDASIM_THREADS="4")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "gpu_cases.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("case", CASES)
def test_simulated_kernels_equal_cpu_fused(simulated, case):
    assert_same(simulated[case], run_case(case, fused, "cpu"), case)


def test_the_comparison_sees_a_flipped_bit(simulated):
    # The cases compare something: one changed output bit is caught.
    got = simulated["ties"]
    changed = dict(got, out=got["out"].clone())
    changed["out"].view(torch.int32)[17] ^= 1
    with pytest.raises(AssertionError, match="values differ"):
        assert_same(changed, run_case("ties", fused, "cpu"), "ties")


def test_cases_cover_what_the_brief_lists(simulated):
    # Ties at the threshold, all-zero inputs, the NaN guard and density edges are in the set.
    zero = simulated["tv_all_zero"]
    assert all(int(h[0]) == 300 for h in zero["first"] if h is not None)  # every |0| in bucket 0
    assert zero["stats"]["nonzero_tv[0]"] == 0
    nan = simulated["tv_nan_guard"]["stats"]
    assert nan["sq_tv[1]"] != nan["sq_tv[1]"] and nan["sq_tv[2]"] == float("inf")
    assert simulated["ties_tiny_density_lambda"]["stats"]["kept[0]"] >= 1  # k = max(1, floor(d n))
    empty = simulated["combine_empty_band_and_ties"]["stats"]
    assert empty["kept[0]"] == 0 and empty["kept[1]"] > 1  # empty band; a band of tied |2|s


def test_method_cases_ran_on_the_kernels(simulated):
    # The methods called the CUDA entry points (counted), not the torch path behind them.
    assert simulated["ties"]["calls"] == {"task_vectors_": 1, "refine_histograms": 1, "combine_into": 1}
    scope = simulated["ties_model_scope"]["calls"]
    assert scope["elected_sign_sum"] == 2 and scope["ties_model_combine_into"] == 1


def _nvvm_home() -> str | None:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    found = sorted(Path("/usr/local").glob("cuda*/nvvm/libdevice"))
    return str(found[-1].parent.parent) if found else None


def test_device_code_has_no_contracted_or_inexact_float32_ops():
    # The real device compiler (NVVM, no GPU needed) on the same source: every float32 multiply
    # is mul.rn (never fused into an FMA by ptxas), no fma.rn.f32, IEEE division only, integer
    # atomics for the histograms. Skipped where no CUDA toolkit (libNVVM) is installed.
    home = _nvvm_home()
    if home is None:
        pytest.skip("no CUDA toolkit (libNVVM) to compile the kernels with")
    env = dict(os.environ, CUDA_HOME=home, NUMBA_ENABLE_CUDASIM="0")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cuda_ptx_check.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in counts:
        pytest.skip(counts["skip"])
    assert set(counts) == {"task_vectors", "refine", "combine", "elected_sign_sum", "model_combine"}
    for name, c in counts.items():
        assert c["fma_f32"] == 0 and c["mul_f32"] == 0, (name, c)
        assert set(c["div_f32"]) <= {"div.rn.f32"}, (name, c)
    assert counts["combine"]["mul_rn_f32"] > 0 and counts["model_combine"]["div_f32"] == ["div.rn.f32"]
    assert counts["task_vectors"]["atomics"] == counts["refine"]["atomics"] == ["atom.global.add.u64"]


def test_in_place_entry_points_refuse_a_non_contiguous_tensor():
    # Checked before any launch, so no simulator is needed to see it.
    from weightsmith.errors import MergeError
    from weightsmith.ops import cuda_fused

    models = torch.zeros(4, 3).t()  # [3, 4] view, not contiguous
    with pytest.raises(MergeError, match="contiguous"):
        cuda_fused.task_vectors_(models, torch.zeros(4), [False] * 3, None)
