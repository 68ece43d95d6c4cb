"""The parts of the prepared GPU check (benchmarks/gpu/check.py) that need no GPU: options,
output comparison, the table and the verdict."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks" / "gpu"))
import check  # noqa: E402


def test_options_default_to_the_issue_run_and_keep_the_cpu_reference():
    args = check.parse_args([])
    assert (args.params, args.models) == ("0.84B", 4)
    assert args.methods == ["task_arithmetic", "ties", "ties_model"]
    assert args.paths == ["cpu", "cuda-torch", "cuda-cupy"]
    args = check.parse_args(["--paths", "cuda-torch", "--methods", "ties", "--budget-s", "60"])
    assert args.paths == ["cpu", "cuda-torch"] and args.methods == ["ties"] and args.budget_s == 60


@pytest.mark.parametrize("bad", [["--methods", "slerp"], ["--paths", "tpu"]])
def test_unknown_methods_or_paths_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        check.parse_args(bad)
    assert "is not one of" in capsys.readouterr().err


def test_ulp_distance_counts_representable_steps_across_zero():
    x = torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=torch.bfloat16)
    up = x.view(torch.int16) + torch.tensor([1, 1, 0, 0], dtype=torch.int16)  # -1 steps away from 0
    assert check.ulp_distance(x, up.view(torch.bfloat16)) == 1
    tiny = torch.tensor([0.0], dtype=torch.float32)
    assert check.ulp_distance(tiny, -tiny) == 0  # +0 and -0 are one value
    neighbours = torch.tensor([1e-45, -1e-45], dtype=torch.float32)
    assert check.ulp_distance(neighbours[:1], neighbours[1:]) == 2


def test_compare_outputs_says_equal_bytes_or_how_far(tmp_path):
    t = {"a": torch.randn(5, 3).bfloat16(), "b": torch.zeros(4).bfloat16()}
    for name in ("ref", "same", "off"):
        (tmp_path / name).mkdir()
    save_file(t, str(tmp_path / "ref" / "model.safetensors"))
    save_file({k: v.clone() for k, v in t.items()}, str(tmp_path / "same" / "model.safetensors"))
    off = {k: v.clone() for k, v in t.items()}
    off["a"].view(torch.int16)[0, 0] += 3
    save_file(off, str(tmp_path / "off" / "model.safetensors"))
    assert check.compare_outputs(tmp_path / "ref", tmp_path / "same") == "equal bytes"
    assert check.compare_outputs(tmp_path / "ref", tmp_path / "off") == "1 values differ, at most 3 ulp"


def test_table_and_verdict():
    runs = [
        check.Run("ties", "cpu", wall_s=10.0),
        check.Run("ties", "cuda-torch", wall_s=4.0, device_peak_bytes=3 * 2**30, check="equal bytes"),
        check.Run("ties", "cuda-cupy", error="skipped: time budget spent"),
    ]
    text = check.table(runs, input_bytes=8 * 10**9)
    assert "| ties | cpu | 10.0 | 0.80 |  |  | reference |" in text
    assert "| ties | cuda-torch | 4.0 | 2.00 | 3.00 GiB | 2.50x | equal bytes |" in text
    assert "skipped" in text
    assert check.verdict({"ok": True, "summary": ""}, runs) == "PASS"
    runs[1].check = "7 values differ, at most 1 ulp"
    assert check.verdict(None, runs).startswith("FAIL: ties cuda-torch: 7 values differ")
    assert check.verdict({"ok": False, "summary": "1 failed"}, runs[:1]) == "FAIL: gpu tests: 1 failed"


def test_a_failed_cupy_merge_fails_the_check():
    runs = [check.Run("ties", "cpu", wall_s=10.0)]
    runs.append(check.Run("ties", "cuda-cupy", error="failed (exit 1): boom"))
    assert check.verdict({"ok": True, "summary": ""}, runs) == "FAIL: ties cuda-cupy: failed (exit 1): boom"


def test_environment_names_what_is_missing_here():
    env = check.environment()
    assert env["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert any("CUDA device" in item for item in env["missing"])
