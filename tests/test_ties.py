"""TIES: mergekit semantics per tensor, the paper's model-wide algorithm with scope: model."""

import json

import pytest
import torch
from click.testing import CliRunner
from models import LLAMA_CONFIG, load_folder, make_family, perturb, random_state, save_model
from sparse_helpers import merge_to_state, mergekit_ties_tensor, recipe, ties_paper_reference

from weightsmith.engine.passes import statistic_units
from weightsmith.errors import MergeError, RecipeError
from weightsmith.ops import MergeInputs, get_method
from weightsmith.ops.ties import TiesModelContext
from weightsmith.pipeline import merge, plan_merge


def run_ties(models, base, **params):
    stacked = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in models])
    inputs = MergeInputs("t", stacked, torch.as_tensor(base, dtype=torch.float32))
    n = len(models)
    params.setdefault("weight", [1.0] * n)
    params.setdefault("density", [1.0] * n)
    out = get_method("ties")(inputs, **params)
    return out, inputs.stats


# --------------------------------------------------------------------------- hand-computed
def test_tensor_scope_hand_computed():
    base = [0.0, 0.0, 0.0, 1.0]
    models = [[3.0, -1.0, 0.5, 1.0], [-2.0, 2.0, 0.25, 3.0], [1.0, -4.0, -0.5, 1.0]]
    # density 0.5 of 4 = keep 2 per model: |tau| top-2:
    #   m0 tau [3, -1, .5, 0] -> [3, -1, 0, 0]; m1 tau [-2, 2, .25, 2] -> [-2, 2, 0, 2] (tie at 2
    #   kept); m2 tau [1, -4, -.5, 0] -> [1, -4, 0, 0].
    # weights [1, 2, 1]: D = [3,-1,0,0], [-4,4,0,4], [1,-4,0,0]
    # sums [0, -1, 0, 4] -> signs [+, -, +, +]
    # agree: c0: m0(3), m2(1) -> (3+1)/(1+1) = 2; c1: m0(-1), m2(-4) -> -5/2; c2: none -> 0;
    #        c3: m1(4) -> 4/2 = 2
    out, stats = run_ties(models, base, weight=[1.0, 2.0, 1.0], density=[0.5] * 3)
    assert out.tolist() == [2.0, -2.5, 0.0, 3.0]
    assert stats["kept[1]"] == 3 and stats["kept[0]"] == 2
    assert stats["conflict"] == 2  # c0 and c1 have both signs among kept entries
    assert stats["elected_pos"] == 2 and stats["elected_neg"] == 1  # c2 has no kept entry
    out, _ = run_ties(models, base, weight=[1.0, 2.0, 1.0], density=[0.5] * 3, normalize=False,
                      **{"lambda": 0.5})
    assert out.tolist() == [2.0, -2.5, 0.0, 3.0]  # (4, -5, 0, 4) * 0.5 + base


def test_tensor_scope_equal_and_opposite_takes_plus():
    # mergekit: sum == 0 elects +1
    out, _ = run_ties([[0.5, 1.0], [-0.5, 1.0]], [0.0, 0.0])
    assert out.tolist() == [0.5, 1.0]


def test_model_scope_cancellation_takes_the_majority_sign():
    models = [[0.5, 1.0, -2.0], [-0.5, 1.0, -2.0]]
    for majority, want in ((-1, -0.5), (1, 0.5)):
        stacked = torch.tensor(models)
        ctx = TiesModelContext((None, None), majority, 3)
        inputs = MergeInputs("t", stacked, torch.zeros(3), context=ctx)
        out = get_method("ties")(inputs, weight=[1.0, 1.0], density=[1.0, 1.0], scope="model")
        assert out.tolist() == [want, 1.0, -2.0]


def test_model_scope_majority_end_to_end(tmp_path):
    """Coordinate 0 of every tensor cancels exactly; the rest lean negative, so the whole
    model's majority sign is -1 and the cancelled coordinates take the negative entry."""
    cfg = dict(LLAMA_CONFIG, num_hidden_layers=1)
    base_state = random_state(cfg, seed=0)
    for v in base_state.values():
        v.reshape(-1)[0] = 0.0  # so that base +- 0.5 is exact in bf16 and cancels exactly
    fts = []
    for sgn in (1, -1):
        st = {}
        for k, v in base_state.items():
            d = torch.full(v.shape, -0.25)
            d.reshape(-1)[0] = 0.5 * sgn
            st[k] = (v.float() + d).to(v.dtype)
        fts.append(st)
    base = save_model(tmp_path / "b", base_state, cfg)
    ms = [save_model(tmp_path / f"m{i}", s, cfg) for i, s in enumerate(fts)]
    out = merge_to_state(recipe("ties", base, ms, {"scope": "model"}), tmp_path / "o")
    ref = ties_paper_reference(base_state, fts, 1.0)
    for k, v in out.items():
        assert torch.equal(v, ref[k].to(v.dtype)), k
        tau0 = fts[1][k].float().reshape(-1)[0] - base_state[k].float().reshape(-1)[0]
        got = v.float().reshape(-1)[0] - base_state[k].float().reshape(-1)[0]
        assert got == tau0 and tau0 < 0


# --------------------------------------------------------------------------- identities
@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_one_task_density_1_is_task_arithmetic(family, tmp_path, scope):
    base, models = family
    ta = merge_to_state(recipe("task_arithmetic", base, models[:1], {"lambda": 0.7},
                               [{"weight": 1.0}]), tmp_path / "ta")
    ti = merge_to_state(recipe("ties", base, models[:1], {"lambda": 0.7, "scope": scope}),
                        tmp_path / "ti")
    assert ta.keys() == ti.keys()
    for k in ta:
        assert torch.equal(ta[k], ti[k]), k


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_identical_task_vectors_merge_to_themselves(family, tmp_path, scope):
    base, models = family
    same = [models[0]] * 3
    out = merge_to_state(recipe("ties", base, same, {"scope": scope}), tmp_path / "o")
    want = load_folder(models[0])
    for k in want:
        assert torch.equal(out[k], want[k]), k
    # trimmed: the same trimmed vector, whichever scope
    out = merge_to_state(recipe("ties", base, same, {"scope": scope, "density": 0.3}), tmp_path / "t")
    single = merge_to_state(recipe("ties", base, [models[0]], {"scope": scope, "density": 0.3}),
                            tmp_path / "s")
    for k in want:
        assert torch.equal(out[k], single[k]), k


def test_one_model_weight_1_is_that_model_and_lambda_0_is_the_base(family, tmp_path):
    base, models = family
    out = merge_to_state(recipe("ties", base, models[:1], {}, [{"weight": 1.0, "density": 1.0}]),
                         tmp_path / "one")
    for k, v in load_folder(models[0]).items():
        assert torch.equal(out[k], v), k
    for scope in ("tensor", "model"):
        out = merge_to_state(recipe("ties", base, models, {"lambda": 0.0, "density": 0.4,
                                                             "scope": scope}), tmp_path / scope)
        for k, v in load_folder(base).items():
            assert torch.equal(out[k], v), (scope, k)


# --------------------------------------------------------------------------- references
def test_tensor_scope_equals_mergekit_semantics_without_ties(tmp_path):
    """float32 inputs have no magnitude ties, so 'keep ties' and mergekit's exactly-k agree."""
    base, models = make_family(tmp_path / "in", 3, dtype=torch.float32)
    dens, w = [0.2, 0.5, 0.35], [1.0, 0.5, 2.0]
    out = merge_to_state(recipe("ties", base, models, {"lambda": 0.9},
                                [{"density": d, "weight": x} for d, x in zip(dens, w)]), tmp_path / "o")
    b, fts = load_folder(base), [load_folder(m) for m in models]
    for k in out:
        want = mergekit_ties_tensor(b[k], [f[k] for f in fts], dens, w, lam=0.9)
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-7)


def test_tensor_scope_differs_from_exact_k_only_at_ties_on_bf16(family, tmp_path):
    base, models = family
    out = merge_to_state(recipe("ties", base, models, {"density": 0.2}), tmp_path / "o")
    b, fts = load_folder(base), [load_folder(m) for m in models]
    differ = total = 0
    for k in out:
        fts_k = [f[k] for f in fts]
        ours = mergekit_ties_tensor(b[k], fts_k, [0.2] * 3, [1.0] * 3, exact_k=False).to(torch.bfloat16)
        assert torch.equal(out[k], ours), k  # same rule, independent code
        exact = mergekit_ties_tensor(b[k], fts_k, [0.2] * 3, [1.0] * 3).to(torch.bfloat16)
        differ += int((exact != out[k]).sum())
        total += out[k].numel()
    assert differ / total < 0.05


# A 128KB budget makes hundreds of units: ~25 s each on a loaded machine. The quick tier keeps
# dis-mean; the other aggregations run in the slow tier (CI runs every tier).
@pytest.mark.parametrize("aggregation", [
    "dis-mean",
    pytest.param("dis-sum", marks=pytest.mark.slow),
    pytest.param("dis-max", marks=pytest.mark.slow),
])
def test_model_scope_equals_flattened_reference(family, tmp_path, aggregation):
    base, models = family
    rec = recipe("ties", base, models, {"scope": "model", "density": 0.2, "lambda": 0.8,
                                        "aggregation": aggregation})
    # a small budget splits big tensors into row blocks, in every pass
    plan = plan_merge(rec, memory_budget="128KB")
    assert len(plan.units) > len(plan.tasks) + 10
    out = merge_to_state(rec, tmp_path / "o", memory_budget="128KB")
    ref = ties_paper_reference(load_folder(base), [load_folder(m) for m in models], 0.2, 0.8, aggregation)
    assert out.keys() == ref.keys()
    for k in out:
        assert torch.equal(out[k], ref[k].to(out[k].dtype)), k


def test_model_scope_counts_tied_tensors_once(tmp_path):
    cfg = dict(LLAMA_CONFIG, num_hidden_layers=1, tie_word_embeddings=True)
    # the checkpoints store both names of the tied matrix (as some .bin exports do)
    def tied(state):
        state = dict(state)
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        return state

    base_state = tied(random_state(cfg, seed=0))
    fts = [tied(perturb(base_state, seed=10 + i)) for i in range(2)]
    base = save_model(tmp_path / "b", base_state, cfg)
    ms = [save_model(tmp_path / f"m{i}", s, cfg) for i, s in enumerate(fts)]
    rec = recipe("ties", base, ms, {"scope": "model", "density": 0.1})
    plan = plan_merge(rec)
    names = [u.task.name for u in statistic_units(plan)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    out = merge_to_state(rec, tmp_path / "o")
    ref = ties_paper_reference(base_state, fts, 0.1, skip=("lm_head.weight",))
    for k in ref:
        assert torch.equal(out[k], ref[k].to(out[k].dtype)), k
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])


# --------------------------------------------------------------------------- report, errors
def test_report_summary_and_cli(family, tmp_path):
    from weightsmith.cli import main

    base, models = family
    rec = recipe("ties", base, models, {"scope": "model", "density": 0.25})
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(rec))
    res = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "o"), "--no-fsync"])
    assert res.exit_code == 0, res.output
    assert "sign conflicts" in res.output and "statistics passes" in res.output
    report = json.loads((tmp_path / "o" / "merge_report.json").read_text())
    s = report["summary"]
    assert s["global_passes"] == 3 and s["scope"] == "model"
    for row in s["models"]:
        assert 0.25 <= row["kept_density"] < 0.3 and row["threshold"] > 0
    assert 0 < s["sign_conflict_fraction"] < s["active_fraction"] <= 1
    per = report["per_tensor"]
    assert sum(t["numel"] for t in per.values()) == s["coordinates"]
    assert sum(t["kept[0]"] for t in per.values()) == s["totals"]["kept[0]"]
    assert abs(s["models"][0]["kept_density"] * s["coordinates"] - s["totals"]["kept[0]"]) < 1e-6


@pytest.mark.parametrize(
    "params, match",
    [
        ({"density": 0.0}, r"must be in \(0, 1\]"),
        ({"density": 1.5}, r"must be in \(0, 1\]"),
        ({"scope": "global"}, "tensor | model"),
        ({"aggregation": "dis-max"}, "applies to scope: model"),
        ({"scope": "model", "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.2}]},
         "cannot vary by tensor"),
        ({"scope": [{"filter": "mlp", "value": "model"}, {"value": "tensor"}]}, "same for every tensor"),
        ({"scope": "model", "rescale": True}, "rescale"),
    ],
)
def test_bad_parameters_are_recipe_errors_at_plan_time(family, params, match):
    base, models = family
    with pytest.raises(RecipeError, match=match):
        plan_merge(recipe("ties", base, models, params))


def test_needs_a_base(family, tmp_path):
    _, models = family
    with pytest.raises(RecipeError, match="base_model"):
        merge({"merge_method": "ties", "models": [{"model": str(m)} for m in models]}, tmp_path / "o")


def test_nan_in_an_input_is_named_even_where_the_trim_would_drop_it(family, tmp_path):
    """A NaN trimmed away or out-voted would leave a finite output; the merge must refuse it."""
    base, models = family
    state = load_folder(models[1])
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    bad = save_model(tmp_path / "bad", state, LLAMA_CONFIG, shards=2)
    with pytest.raises(MergeError) as e:
        merge(recipe("ties", base, [models[0], bad, models[2]], {"density": 0.2}), tmp_path / "out")
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and str(bad) in msg and "NaN" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("use_fused", [True, False])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_tensors_over_the_budget_merge_in_row_blocks_with_the_same_result(
    tmp_path, monkeypatch, use_fused, method
):
    """Per-tensor thresholds from streamed statistics passes over row blocks give the bytes
    a whole-tensor merge gives, on the fused and the torch path; no one-off whole buffers."""
    monkeypatch.setenv("WEIGHTSMITH_FUSED", "1" if use_fused else "0")
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (512, 256), "b.weight": (300, 200), "c.bias": (100000,)}
    base_state = {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items()}
    folders = [save_model(tmp_path / "base", base_state, {})]
    for i in range(3):
        st = {k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).bfloat16()
              for k, v in base_state.items()}
        folders.append(save_model(tmp_path / f"m{i}", st, {}))
    params = [{"weight": w, "density": d, "gamma": 0.02} for w, d in [(0.5, 0.2), (0.3, 0.3), (0.2, 0.6)]]
    if method == "ties":
        for p in params:
            del p["gamma"]
    r = recipe(method, folders[0], folders[1:], {}, params, dtype="float32")
    whole = merge_to_state(r, tmp_path / "whole")
    budget = 12 * 2**20
    plan = plan_merge(r, memory_budget=budget)
    split = {u.task.name for u in plan.units if u.rows is not None}
    assert split == set(shapes) and not plan.oversize
    blocks = merge_to_state(r, tmp_path / "blocks", memory_budget=budget)
    report = json.loads((tmp_path / "blocks" / "merge_report.json").read_text())
    assert report["summary"]["global_passes"] == 2
    for k in shapes:
        assert torch.equal(whole[k].view(torch.int16), blocks[k].view(torch.int16)), k
