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


def test_spectral_options_and_their_commands(tmp_path):
    args = check.parse_args([])
    assert args.spectral == ["tsv", "iso_c", "iso_cts", "extract_lora"] and args.matrix_size == 4096
    args = check.parse_args(["--spectral", "tsv,extract_lora", "--extract-rank", "8", "--paths", "cpu"])
    folders = [tmp_path / "base", tmp_path / "ft0"]
    cpu = check.spectral_command("extract_lora", folders, tmp_path / "r.yaml", tmp_path / "o", "cpu", args)
    assert cpu[:4] == ["extract-lora", str(folders[1]), str(folders[0]), str(tmp_path / "o")]
    assert cpu[4:7] == ["--rank", "8", "-q"] and "--memory-budget" in cpu and "--device" not in cpu
    gpu = check.spectral_command("tsv", folders, tmp_path / "r.yaml", tmp_path / "o", "cuda-torch", args)
    assert gpu[:2] == ["merge", str(tmp_path / "r.yaml")] and gpu[-2:] == ["--device", "cuda"]
    assert check.parse_args(["--spectral", ""]).spectral == []
    with pytest.raises(SystemExit):
        check.parse_args(["--spectral", "slerp"])


def test_spectral_outputs_compare_within_a_tolerance(tmp_path):
    import json

    t = {"a": torch.randn(5, 3).bfloat16()}
    for name in ("ref", "near", "far"):
        (tmp_path / name).mkdir()
    save_file(t, str(tmp_path / "ref" / "model.safetensors"))
    for name, steps in (("near", check.SPECTRAL_ULP), ("far", check.SPECTRAL_ULP + 1)):
        off = {"a": t["a"].clone()}
        off["a"].view(torch.int16)[0, 0] += steps
        save_file(off, str(tmp_path / name / "model.safetensors"))
    assert check.spectral_check("tsv", tmp_path / "ref", tmp_path / "ref") == ("equal bytes", True)
    assert check.spectral_check("tsv", tmp_path / "ref", tmp_path / "near")[1] is True
    assert check.spectral_check("iso_c", tmp_path / "ref", tmp_path / "far")[1] is False
    for name, err in (("ref", 0.90), ("near", 0.905), ("far", 0.95)):
        modules = [{"module": "m", "rank": 4, "relative_error": err},
                   {"module": "n", "rank": 0, "relative_error": 1}]  # not a LoRA module: ignored
        (tmp_path / name / "extract_report.json").write_text(json.dumps({"modules": modules}))
    text, ok = check.spectral_check("extract_lora", tmp_path / "ref", tmp_path / "near")
    assert ok and text == "worst relative error 0.9050 (CPU 0.9000)"
    assert check.spectral_check("extract_lora", tmp_path / "ref", tmp_path / "far")[1] is False


def test_spectral_rows_in_the_verdict_and_tables():
    runs = [check.Run("tsv", "cpu", wall_s=20.0, extra={"input_bytes": 10**9, "spectral": True})]
    runs.append(check.Run("tsv", "cuda-torch", wall_s=2.0, check="3 values differ, at most 1 ulp",
                          extra={"input_bytes": 10**9, "spectral": True, "within": True}))
    assert check.verdict({"ok": True, "summary": ""}, runs) == "PASS"  # within tolerance: not bytes
    runs[1].extra["within"] = False
    assert check.verdict(None, runs).startswith("FAIL: tsv cuda-torch: 3 values differ")
    assert "| tsv | cuda-torch | 2.0 | 0.50 |" in check.table(runs, input_bytes=8 * 10**9)  # its own bytes
    rows = [{"method": "tsv", "device": "cpu", "size": 4096, "wall_s": 30.1, "cpu_s": 200.5},
            {"device": "cuda", "error": "skipped: time budget spent"}]
    text = check.matrix_table(rows)
    assert "| tsv | cpu | 4096 x 4096 | 30.1 | 200.5 |" in text and "|  | cuda | | | skipped" in text
