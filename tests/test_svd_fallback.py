"""A LAPACK SVD that does not converge (seen once, iso_cts on synthetic 0.25B checkpoints): the
spectral merges retry in float64, and where that fails too, say which tensor and what to do."""

from __future__ import annotations

import pytest
import torch

from weightsmith.errors import MergeError
from weightsmith.ops import MergeInputs, get_method
from weightsmith.ops import tsv as tsv_module

REAL_SVD = torch.linalg.svd


def _failing_svd(fail_dtypes: tuple[torch.dtype, ...]):
    calls: list[torch.dtype] = []

    def svd(x, *args, **kwargs):
        calls.append(x.dtype)
        if x.dtype in fail_dtypes:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return REAL_SVD(x, *args, **kwargs)

    return svd, calls


def _inputs(seed: int = 0) -> MergeInputs:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(12, 8, generator=g)
    models = base + 0.1 * torch.randn(3, 12, 8, generator=g)
    return MergeInputs("model.layers.0.mlp.up_proj.weight", models, base)


def test_thin_svd_retries_in_float64_and_casts_back(monkeypatch):
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(1))
    svd, calls = _failing_svd((torch.float32,))
    monkeypatch.setattr(torch.linalg, "svd", svd)
    u, s, vh = tsv_module.thin_svd(x)
    assert calls == [torch.float32, torch.float64]
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    u64, s64, vh64 = REAL_SVD(x.double(), full_matrices=False)
    assert torch.equal(s, s64.float()) and torch.equal(u, u64.float()) and torch.equal(vh, vh64.float())


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_a_merge_whose_float32_svd_fails_is_the_float64_merge(monkeypatch, method):
    expected = get_method(method)(_inputs(), weight=[1.0] * 3)
    # The same merge computed with every SVD in float64 (cast back): what the retry gives when
    # every float32 SVD fails.
    def svd64(x, *args, **kwargs):
        u, s, vh = REAL_SVD(x.double(), *args, **kwargs)
        return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)

    monkeypatch.setattr(torch.linalg, "svd", svd64)
    by_float64 = get_method(method)(_inputs(), weight=[1.0] * 3)
    svd, calls = _failing_svd((torch.float32,))
    monkeypatch.setattr(torch.linalg, "svd", svd)
    retried = get_method(method)(_inputs(), weight=[1.0] * 3)
    assert torch.float64 in calls
    assert torch.equal(retried, by_float64)
    assert torch.allclose(retried, expected, atol=1e-5)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_an_svd_failing_in_float64_too_names_the_tensor_and_the_fix(monkeypatch, method):
    svd, _ = _failing_svd((torch.float32, torch.float64))
    monkeypatch.setattr(torch.linalg, "svd", svd)
    with pytest.raises(MergeError) as err:
        get_method(method)(_inputs(), weight=[1.0] * 3)
    text = str(err.value)
    assert method in text and "model.layers.0.mlp.up_proj.weight" in text and "[12, 8]" in text
    assert "task_arithmetic" in text  # the fix
