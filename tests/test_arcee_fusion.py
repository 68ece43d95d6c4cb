"""Arcee Fusion: |delta| x row KL importance, kept above median + 1.5 IQR."""

import json

import torch
import torch.nn.functional as F
from sparse_helpers import merge_to_state, whole_tensor_budget

from weightsmith.ops import MergeInputs, get_method
from weightsmith.ops.arcee_fusion import quantile_threshold
from weightsmith.pipeline import plan_merge


def run(model, base):
    inputs = MergeInputs("t", model.unsqueeze(0).clone(), base.clone())
    return get_method("arcee_fusion")(inputs), inputs.stats


def reference(model, base):
    """Written out with a full sort (float32)."""
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    imp = (model - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    s = imp.reshape(-1).sort().values
    n = s.numel()
    q1, med, q3 = s[int(0.25 * (n - 1))], s[int(0.5 * (n - 1))], s[int(0.75 * (n - 1))]
    return base + (model - base) * (imp >= med + 1.5 * (q3 - q1))


def test_hand_computed_threshold():
    # sorted 0..10: Q1 = s[2] = 2, median = s[5] = 5, Q3 = s[7] = 7 -> 5 + 1.5 * 5 = 12.5
    assert quantile_threshold(torch.arange(11.0)) == 12.5
    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # Q1 = median = Q3 = 0: threshold 0
    assert quantile_threshold(scores) == 0


def test_matches_the_written_out_reference():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 16, generator=g)
    model = base + 0.1 * torch.randn(40, 16, generator=g) * (torch.rand(40, 1, generator=g) * 3)
    got, stats = run(model, base)
    want = reference(model, base)
    assert torch.equal(got, want)
    assert 0 < stats["fused"] < 0.5 * got.numel()  # an outlier rule: a minority is taken


def test_identical_model_gives_the_base():
    base = torch.randn(8, 8)
    out, _ = run(base.clone(), base)
    assert torch.equal(out, base)


def test_whole_tensors_under_a_tiny_budget_and_report(family, tmp_path):
    base, models = family
    rec = {"merge_method": "arcee_fusion", "base_model": str(base), "models": [{"model": str(models[0])}]}
    assert plan_merge(rec, memory_budget="4KB").oversize  # per-tensor quantiles: whole tensors
    small = merge_to_state(rec, tmp_path / "small", memory_budget=whole_tensor_budget(rec))
    big = merge_to_state(rec, tmp_path / "big")
    for k in big:
        assert torch.equal(small[k], big[k]), k
    report = json.loads((tmp_path / "big" / "merge_report.json").read_text())
    assert 0 < report["summary"]["fused_fraction"] < 0.5
