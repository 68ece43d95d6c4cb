"""On a real CUDA device: the SVD-heavy work runs there. tsv / iso_c / iso_cts merges with
``--device cuda`` call torch.linalg.svd on CUDA tensors (the device pipeline's compute stage)
and write the CPU's values to within cuSOLVER-vs-LAPACK rounding; extract-lora ``--device
cuda`` factors on the GPU with the CPU's errors. Skipped without a GPU
(benchmarks/gpu/check.sh runs them; tests/test_lora_budget.py covers the same paths on the
cpu-staged fake device in CI)."""

import json

import pytest
import torch
from models import load_folder, make_family

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _devices_seen(monkeypatch, module, name: str) -> list[str]:
    seen: list[str] = []
    real = getattr(module, name)

    def spy(matrix, *args, **kwargs):
        seen.append(matrix.device.type)
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_spectral_merges_run_their_svds_on_the_gpu(tmp_path, monkeypatch, method):
    from weightsmith.pipeline import merge

    base, models = make_family(tmp_path / "in", n_models=2, shards=1)
    r = {"merge_method": method, "base_model": str(base), "dtype": "float32", "out_dtype": "float32",
         "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}
    merge(r, tmp_path / "cpu")
    seen = _devices_seen(monkeypatch, torch.linalg, "svd")
    merge(r, tmp_path / "gpu", device="cuda")
    assert seen and set(seen) == {"cuda"}
    a, b = load_folder(tmp_path / "cpu"), load_folder(tmp_path / "gpu")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_extract_lora_factors_on_the_gpu_with_the_cpu_errors(tmp_path, monkeypatch, svd):
    import weightsmith.lora_extraction as extraction

    base, models = make_family(tmp_path / "in", n_models=1, shards=1)
    extraction.extract_lora(models[0], base, tmp_path / "cpu", rank=4, svd=svd)
    seen = _devices_seen(monkeypatch, extraction, "truncated_svd")
    extraction.extract_lora(models[0], base, tmp_path / "gpu", rank=4, svd=svd, device="cuda")
    assert seen and set(seen) == {"cuda"}
    errors = [{m["module"]: m["relative_error"] for m in json.loads((tmp_path / d / "extract_report.json")
              .read_text())["modules"] if m["rank"]} for d in ("cpu", "gpu")]
    assert errors[0].keys() == errors[1].keys() and errors[0]
    for module, err in errors[0].items():
        assert errors[1][module] == pytest.approx(err, rel=1e-2, abs=1e-4), module
