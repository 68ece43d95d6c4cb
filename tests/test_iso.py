"""ISO-C and ISO-CTS (isotropic merging): identities, hand-checked cases, the authors' outputs,
and a whole merge through the recipe path."""

import json
from pathlib import Path

import pytest
import torch
from models import load_folder
from sparse_helpers import merge_to_state, recipe

from weightsmith.errors import RecipeError
from weightsmith.ops import MergeInputs, get_method
from weightsmith.ops.iso import subspace_sizes
from weightsmith.pipeline import plan_merge

GOLDEN = json.loads((Path(__file__).parent / "data" / "spectral_golden.json").read_text())


def run(method, models, base, **params):
    stacked = torch.stack([torch.as_tensor(m) for m in models]).clone()
    params.setdefault("weight", [1.0] * len(models))
    return get_method(method)(MergeInputs("t", stacked, torch.as_tensor(base).clone()), **params)


def polar(x):
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def paper_iso_c(taus):
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return s.mean() * u @ vh


def paper_iso_cts(taus, fraction):
    """ISO-CTS as the paper's Algorithm 1: common subspace from the sum, each task's top
    directions of its residual, stacked in a k-wide U and V, orthogonalised whole, constant
    spectrum. Written independently of weightsmith (task directions first here, common last)."""
    t_count, (m, n) = len(taus), taus[0].shape
    k = min(m, n)
    c0 = int(k * fraction)
    d = round((k - c0) / t_count)
    c = k - d * t_count
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    cols_u, cols_s, rows_v = [], [], []
    for tau in taus:
        ut, st, vht = torch.linalg.svd(tau - u[:, :c] @ u[:, :c].T @ tau, full_matrices=False)
        cols_u.append(ut[:, :d])
        cols_s.append(st[:d])
        rows_v.append(vht[:d])
    big_u = torch.cat([*cols_u, u[:, :c]], 1)
    big_v = torch.cat([*rows_v, vh[:c]], 0)
    s_all = torch.cat([*cols_s, s[:c]])
    return s_all.mean() * polar(big_u) @ polar(big_v)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["name"])
def test_matches_the_authors_code_on_recorded_cases(case):
    # Outputs of danielm1405/iso-merging's iso_c and iso_cts (run once on these inputs; see
    # tests/data/spectral_golden.json "source"), with a zero base so the output is the merged
    # task vector exactly as they return it (alpha 1).
    taus_w, taus_b = torch.tensor(case["tau_w"]), torch.tensor(case["tau_b"])
    zeros_w, zeros_b = torch.zeros(taus_w.shape[1:]), torch.zeros(taus_b.shape[1:])
    frac = case["common_space_fraction"]
    assert torch.allclose(run("iso_c", taus_w, zeros_w), torch.tensor(case["iso_c_w"]), atol=2e-5, rtol=1e-4)
    out = run("iso_cts", taus_w, zeros_w, common_space_fraction=frac)
    assert torch.allclose(out, torch.tensor(case["iso_cts_w"]), atol=2e-5, rtol=1e-4)
    for method in ("iso_c", "iso_cts"):
        assert torch.allclose(run(method, taus_b, zeros_b), torch.tensor(case[f"{method}_b"]), atol=1e-6)


@pytest.mark.parametrize("shape,t_count,fraction,dtype", [
    ((16, 16), 2, 0.8, torch.float32), ((20, 12), 3, 0.5, torch.float32),
    ((9, 14), 4, 0.8, torch.float64), ((30, 30), 8, 0.8, torch.float64),
])
def test_matches_the_papers_algorithm(shape, t_count, fraction, dtype):
    g = torch.Generator().manual_seed(sum(shape) + t_count)
    base = torch.randn(shape, generator=g, dtype=dtype)
    models = [base + torch.randn(shape, generator=g, dtype=dtype) for _ in range(t_count)]
    taus = [m - base for m in models]
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    out_c = run("iso_c", models, base, alpha=1.3)
    assert out_c.dtype == dtype
    assert torch.allclose(out_c, base + 1.3 * paper_iso_c(taus), atol=tol, rtol=tol)
    out_cts = run("iso_cts", models, base, alpha=1.3, common_space_fraction=fraction)
    assert torch.allclose(out_cts, base + 1.3 * paper_iso_cts(taus, fraction), atol=tol, rtol=tol)


def test_iso_c_hand_computed_spectrum_flattening():
    # tau_1 = diag(3, 0), tau_2 = diag(0, 1): the sum diag(3, 1) has U = V = I and mean
    # singular value 2, so the merged task vector is 2 I.
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t1, t2 = torch.diag(torch.tensor([3.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))
    expected = base + 0.5 * 2 * torch.eye(2)
    assert torch.allclose(run("iso_c", [base + t1, base + t2], base, alpha=0.5), expected, atol=1e-6)
    # ISO-CTS with one direction per task (fraction 0): each task's own top direction, same.
    out = run("iso_cts", [base + t1, base + t2], base, alpha=0.5, common_space_fraction=0.0)
    assert torch.allclose(out, expected, atol=1e-6)


def test_a_scaled_orthogonal_task_vector_comes_back():
    # ISO-C keeps a task vector whose spectrum is already flat: c Q for orthogonal Q.
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    base = torch.randn(6, 6, generator=g)
    for method in ("iso_c", "iso_cts"):
        assert torch.allclose(run(method, [base + 0.3 * q], base), base + 0.3 * q, atol=1e-5), method
    # A general task vector is changed (its spectrum is flattened): not the identity.
    tau = torch.randn(6, 6, generator=g)
    assert not torch.allclose(run("iso_c", [base + tau], base), base + tau, atol=1e-2)


def test_rank_one_sum_keeps_only_its_direction():
    # A rank-1 sum a b^T: its one nonzero singular value is the mean of the kept ones, so
    # ISO-C returns it unchanged (the directions of zero singular values are left out).
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(7, 1, generator=g), torch.randn(1, 5, generator=g)
    base = torch.randn(7, 5, generator=g)
    out = run("iso_c", [base + a @ b, base + 2 * a @ b], base)
    assert torch.allclose(out, base + 3 * a @ b, atol=1e-5)


def test_alpha_zero_is_the_base_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 4, generator=g)
    base[1, 1] = -0.0
    for method in ("iso_c", "iso_cts"):
        out = run(method, [torch.randn(5, 4, generator=g) for _ in range(2)], base, alpha=0.0)
        assert torch.equal(out, base) and torch.signbit(out[1, 1]), method


def test_full_common_space_is_iso_c():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(12, 10, generator=g)
    models = [base + torch.randn(12, 10, generator=g) for _ in range(3)]
    cts = run("iso_cts", models, base, common_space_fraction=1.0)
    assert torch.allclose(cts, run("iso_c", models, base), atol=1e-5)
    assert not torch.allclose(run("iso_cts", models, base, common_space_fraction=0.5), cts, atol=1e-3)


def test_subspace_sizes_follow_the_reference_rounding():
    assert subspace_sizes(768, 8, 0.8) == (616, 19)  # 614 common, round(154 / 8) = 19 each
    assert subspace_sizes(10, 4, 0.5) == (6, 1)  # round(5 / 4) = 1 each, the rest common
    assert subspace_sizes(10, 4, 0.3) == (2, 2)  # round(7 / 4) = 2 each
    assert subspace_sizes(6, 2, 0.0) == (0, 3)
    # more task directions than fit (round up past k): floor instead of a negative common size
    assert subspace_sizes(12, 8, 0.0) == (4, 1)


def test_non_matrices_and_excluded_matrices_take_the_mean():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(9, generator=g)
    models = [torch.randn(9, generator=g) for _ in range(3)]
    expected = base + 2.0 * torch.stack([m - base for m in models]).mean(0)
    for method in ("iso_c", "iso_cts"):
        assert torch.allclose(run(method, models, base, alpha=2.0), expected, atol=1e-6)
    base = torch.randn(4, 4, generator=g)
    models = [torch.randn(4, 4, generator=g) for _ in range(2)]
    expected = base + torch.stack([m - base for m in models]).mean(0)
    assert torch.allclose(run("iso_c", models, base, spectral=False), expected, atol=1e-6)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_whole_merge_through_the_recipe_path(family, tmp_path, method):
    base, models = family
    out = merge_to_state(recipe(method, base, models, {"alpha": 1.5}), tmp_path / "o")
    b, fts = load_folder(base), [load_folder(m) for m in models]
    name = "model.layers.2.self_attn.q_proj.weight"
    taus = [ft[name].float() - b[name].float() for ft in fts]
    delta = paper_iso_c(taus) if method == "iso_c" else paper_iso_cts(taus, 0.8)
    expected = b[name].float() + 1.5 * delta
    assert torch.allclose(out[name].float(), expected, atol=1e-2, rtol=1e-2)
    assert (out[name] != b[name]).any()
    assert set(out) == set(b)


def test_bad_common_space_fraction_is_refused_at_plan_time(family):
    base, models = family
    with pytest.raises(RecipeError, match="common_space_fraction"):
        plan_merge(recipe("iso_cts", base, models, {"common_space_fraction": -0.1}))
