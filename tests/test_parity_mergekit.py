"""Parity with mergekit 0.1.5: same recipes, same inputs, outputs equal to one bf16 step.

Top-k methods (ties, breadcrumbs, breadcrumbs_ties) have one allowed difference: mergekit keeps
exactly k entries of each task vector per tensor, choosing among magnitudes tied at the
threshold in arbitrary sort order, while weightsmith keeps every tied entry. For those recipes
fewer than 5% of the elements may differ by more than one bf16 step, and every element of
mergekit's output must be, to one bf16 step, what some choice among the tied entries gives: the
differences are the ties and nothing else.

SCE selects coordinates by variance with the same exactly-k versus ties-kept difference and the
same allowance (differences only in tensors with a variance tie at the threshold). DELLA's masks
are random (mergekit draws them from torch's global generator), so della recipes are compared by
statistics: the share of elements changed, that share per magnitude-rank quintile, and the norm
of the change.

The golden outputs under tests/data/parity/golden/ were written by ``mergekit-yaml`` (run by
benchmarks/parity/make_golden.py, see tests/data/parity/README.md). The inputs are not stored:
this test rebuilds them from the seeds in inputs.json and first checks they are bit-identical to
the ones the goldens were made from.

Set WEIGHTSMITH_MERGEKIT=/path/to/mergekit-yaml to also run mergekit live, side by side with
weightsmith, on inputs built from other seeds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mergekit_parity import hash_tensors, ordered_bits, run_mergekit_yaml, write_char_tokenizer
from models import load_folder, perturb, random_state, save_model
from safetensors.torch import load_file

import weightsmith

DATA = Path(__file__).parent / "data" / "parity"
RECIPES = sorted((DATA / "recipes").glob("*.yaml"))
GOLDEN = DATA / "golden"
# The --numerics mergekit set: the same recipes with dtype bfloat16 / float16 (see README.md).
NUMERICS_RECIPES = sorted((DATA / "recipes_numerics").glob("*.yaml"))
NUMERICS_GOLDEN = DATA / "golden_numerics"
SPEC: dict[str, Any] = json.loads((DATA / "inputs.json").read_text())
MERGEKIT_ENV = "WEIGHTSMITH_MERGEKIT"
# Methods that keep the k largest |delta| (or a magnitude band) per tensor, and the share of
# output elements that may differ from mergekit by more than one bf16 step because of ties.
TOPK_METHODS = ("ties", "breadcrumbs", "breadcrumbs_ties")
CONSENSUS_METHODS = ("ties", "breadcrumbs_ties")
TIE_ALLOWANCE = 0.05
# Methods that select coordinates by their variance across the task vectors (exactly k in
# mergekit, every coordinate tied at the threshold here): the same tie allowance.
VARIANCE_TOPK_METHODS = ("sce",)
# Random methods: mergekit draws its masks from torch's global generator, so outputs agree in
# distribution only. Compared by statistics with these tolerances (absolute, relative for norms).
RANDOM_METHODS = ("della", "della_linear")
CHANGED_TOLERANCE = 0.02  # share of elements the merge changed from the base
RANK_KEEP_TOLERANCE = 0.04  # share changed per magnitude-rank quintile of the first task vector
NORM_TOLERANCE = 0.05  # |output - base| over the model


# --------------------------------------------------------------------------- inputs
def build_inputs(root: Path, seed_offset: int = 0) -> dict[str, Path]:
    """The base and fine-tunes of inputs.json as sharded bf16 checkpoints under ``root``."""
    config = SPEC["config"]
    base_state = random_state(config, seed=SPEC["base_seed"] + seed_offset)
    states = {"base": base_state}
    for name, seed in SPEC["finetune_seeds"].items():
        states[name] = perturb(base_state, seed=seed + seed_offset, scale=SPEC["perturb_scale"])
    folders = {}
    for name, state in states.items():
        folders[name] = save_model(root / name, state, config, shards=SPEC["shards"], tokenizer=False)
        write_char_tokenizer(folders[name], config["vocab_size"])
    return folders


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    hash_tensors(h, sorted(state.items()))
    return h.hexdigest()


def input_digests(folders: dict[str, Path]) -> dict[str, str]:
    return {name: state_digest(load_folder(folder)) for name, folder in folders.items()}


def materialize(recipe_path: Path, folders: dict[str, Path]) -> dict[str, Any]:
    """The recipe with its model names (base, ft0, ...) replaced by the input folders' paths."""
    raw = yaml.safe_load(recipe_path.read_text())

    def path_of(name: str) -> str:
        return str(folders[name].resolve())

    if "base_model" in raw:
        raw["base_model"] = path_of(raw["base_model"])
    if "models" in raw:
        raw["models"] = [{**entry, "model": path_of(entry["model"])} for entry in raw["models"]]
    for piece in raw.get("slices", []):  # slices: each source, and a slice's own base
        piece["sources"] = [{**src, "model": path_of(src["model"])} for src in piece["sources"]]
        if "base_model" in piece:
            piece["base_model"] = path_of(piece["base_model"])
    return raw


def run_mergekit(exe: str, recipe: dict[str, Any], out: Path, workdir: Path) -> Path:
    """Run ``mergekit-yaml`` offline on a materialized recipe; returns the output folder."""
    return run_mergekit_yaml(exe, recipe, workdir / f"{out.name}.yaml", out)


# --------------------------------------------------------------------------- comparison
def bf16_step(magnitude: torch.Tensor) -> torch.Tensor:
    """Spacing between adjacent bf16 values at this magnitude (one bf16 rounding step)."""
    _, exponent = torch.frexp(magnitude)
    return torch.ldexp(torch.full_like(magnitude, torch.finfo(torch.bfloat16).eps), exponent - 1)


def allowed_error(ours: torch.Tensor, theirs: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """One bf16 step at the result's magnitude; where the inputs cancel to about zero, the
    float32 rounding noise of summing them (n * eps32 * sum |x_i|), which is far below a bf16
    step of the inputs but above one of a near-zero result."""
    step = bf16_step(torch.maximum(ours.float().abs(), theirs.float().abs()))
    if not inputs:
        return step
    magnitude = torch.stack([x.float().abs() for x in inputs]).sum(0)
    return torch.maximum(step, len(inputs) * torch.finfo(torch.float32).eps * magnitude)


@dataclass
class TensorDiff:
    name: str
    max_abs: float
    differing: int  # elements whose bits differ
    max_steps: int  # largest distance in adjacent bf16 values
    over: int  # elements beyond the allowed error


def compare(
    ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], inputs: list[dict[str, torch.Tensor]]
) -> list[TensorDiff]:
    diffs = []
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype == torch.bfloat16, f"{name}: dtypes {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{name}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        error = (a.float() - b.float()).abs()
        steps = (ordered_bits(a) - ordered_bits(b)).abs()
        # A stacked output's deeper layers are in no input under their name: one step then.
        allowed = allowed_error(a, b, [x[name] for x in inputs if name in x])
        diffs.append(
            TensorDiff(
                name,
                error.max().item() if a.numel() else 0.0,
                int((steps != 0).sum()),
                int(steps.max()) if a.numel() else 0,
                int((error > allowed).sum()),
            )
        )
    return diffs


def report(label: str, diffs: list[TensorDiff], ours: dict[str, torch.Tensor]) -> None:
    total = sum(t.numel() for t in ours.values())
    over = sum(d.over for d in diffs)
    print(
        f"\n{label}: {sum(d.differing == 0 for d in diffs)}/{len(diffs)} tensors bit-identical, "
        f"{sum(d.differing for d in diffs)} of {total} elements differ "
        f"(at most {max(d.max_steps for d in diffs)} bf16 values apart), "
        f"{over} ({over / total:.3%}) beyond one bf16 step, "
        f"max abs diff {max(d.max_abs for d in diffs):.3g}"
    )


def check_parity(
    label: str,
    ours: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
    inputs: list[dict[str, torch.Tensor]],
) -> None:
    only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    assert not only_ours and not only_theirs, (
        f"{label}: key sets differ; only in weightsmith: {only_ours}; only in mergekit: {only_theirs}"
    )
    diffs = compare(ours, theirs, inputs)
    report(label, diffs, ours)
    off = [d for d in diffs if d.over]
    assert not off, f"{label}: beyond one bf16 rounding step from mergekit in " + ", ".join(
        f"{d.name} ({d.over} elements, up to {d.max_steps} bf16 values apart, max abs {d.max_abs:.3g})"
        for d in off
    )


@dataclass
class Selection:
    """One task vector's selection in one tensor as an exactly-k implementation makes it, short
    of its tie order: ``inside`` entries are kept whatever the order; ``tied`` ones (magnitude
    equal to a boundary of the kept range, where some equal entries are cut) may be kept or
    dropped. Zeros never count as tied: a zero entry adds nothing and never takes part in a sign
    election."""

    inside: torch.Tensor
    tied: torch.Tensor


def mergekit_selection(delta: torch.Tensor, params: dict[str, Any], i: int) -> Selection:
    """Model i's kept set in mergekit 0.1.5, up to ties. ``magnitude`` (ties): the k =
    max(1, floor(density n)) largest |delta|. ``magnitude_outliers`` (breadcrumbs): ascending ranks
    [n_bot, n_bot + n_keep), n_keep = floor(density n), n_bot = max(0, n - n_keep - floor(gamma n)).
    density >= 1 keeps everything."""
    mag = delta.abs()
    n = mag.numel()
    density = params["density"][i]
    none = torch.zeros_like(mag, dtype=torch.bool)
    if density >= 1:
        return Selection(~none, none)
    ascending = mag.sort().values
    if "gamma" in params:
        n_keep = int(density * n)
        if n_keep == 0:
            return Selection(none, none)
        n_bot = max(0, n - n_keep - int(params["gamma"][i] * n))
        lo, hi = ascending[n_bot], ascending[n_bot + n_keep - 1]
        cut_below, cut_above = n_bot > 0, n_bot + n_keep < n
    else:
        k = max(1, int(density * n))
        lo, hi = ascending[n - k], ascending[-1]
        cut_below, cut_above = k < n, False
    tied = none.clone()
    if cut_below:
        tied |= mag == lo
    if cut_above:
        tied |= mag == hi
    tied &= mag > 0
    return Selection((mag >= lo) & (mag <= hi) & ~tied, tied)


def reference_merge(
    method: str, base: torch.Tensor, deltas: torch.Tensor, kept: torch.Tensor, params: dict[str, Any]
) -> torch.Tensor:
    """Generalized task arithmetic on given kept sets (float32), as docs/methods/sparse.md
    states it, cast to bf16."""
    weight = torch.tensor(params["weight"], dtype=torch.float32).unsqueeze(1)
    d = deltas * kept * weight
    if method in CONSENSUS_METHODS:
        elected = torch.where(d.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(d) == elected
        merged = (d * agree).sum(0)
        divisor = (weight * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        merged = d.sum(0)
        divisor = weight.sum()
        divisor = divisor if divisor.abs() >= 1e-8 else torch.ones(())
    if params["normalize"]:
        merged = merged / divisor
    if params["lambda"] != 1:
        merged = merged * params["lambda"]
    return (base + merged).to(torch.bfloat16)


def check_topk_parity(
    label: str,
    raw: dict[str, Any],
    ours: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
    states: dict[str, dict[str, torch.Tensor]],
) -> None:
    """The top-k allowance: under TIE_ALLOWANCE of the elements beyond one bf16 step, all of
    them explained by threshold ties. ``states`` maps each input's path in ``raw`` to its tensors.

    Per tensor, the reference merge is computed for every choice of keeping or dropping each
    model's tied entries (2^N variants): weightsmith must equal the keep-all variant, and each
    element of mergekit's output must equal some variant (to one bf16 step)."""
    assert sorted(ours) == sorted(theirs), f"{label}: key sets differ"
    method = raw["merge_method"]
    inputs = list(states.values())
    diffs = compare(ours, theirs, inputs)
    report(label, diffs, ours)
    tasks = {t.name: t for t in weightsmith.plan_merge(raw).tasks if t.kind == "merge"}
    base_state = states[raw["base_model"]]
    model_states = [states[e["model"]] for e in raw["models"] if e["model"] != raw["base_model"]]
    total = tied_elements = 0
    for d in diffs:
        name = d.name
        total += ours[name].numel()
        if name not in tasks:
            assert not d.over, f"{label}: {name} (not merged) beyond one bf16 step from mergekit"
            continue
        params = tasks[name].params
        base = base_state[name].float().reshape(-1)
        deltas = torch.stack([m[name].float().reshape(-1) - base for m in model_states])
        selections = [mergekit_selection(deltas[i], params, i) for i in range(len(deltas))]
        has_ties = [bool(s.tied.any()) for s in selections]
        tied_elements += int(torch.stack([s.tied for s in selections]).any(0).sum())
        ours_flat, theirs_flat = ours[name].reshape(-1), theirs[name].reshape(-1)
        flat_inputs = [x[name].reshape(-1) for x in inputs]
        explained = torch.zeros_like(base, dtype=torch.bool)
        for choice in itertools.product((True, False), repeat=len(deltas)):
            if any(keep_tied and not has for keep_tied, has in zip(choice, has_ties)):
                continue  # same kept sets as the variant that drops them
            kept = torch.stack([s.inside | (s.tied & c) for s, c in zip(selections, choice)])
            variant = reference_merge(method, base, deltas, kept, params)
            close = (variant.float() - theirs_flat.float()).abs() <= allowed_error(
                variant, theirs_flat, flat_inputs
            )
            explained |= close
            if all(c or not has for c, has in zip(choice, has_ties)):  # every tied entry kept
                off = (variant.float() - ours_flat.float()).abs() > allowed_error(
                    variant, ours_flat, flat_inputs
                )
                assert not off.any(), (
                    f"{label}: {name}: weightsmith is not the merge that keeps every tied entry "
                    f"at {int(off.sum())} elements"
                )
        assert explained.all(), (
            f"{label}: {name}: mergekit's output at {int((~explained).sum())} elements is not what "
            "any choice among the threshold-tied entries gives"
        )
    over = sum(d.over for d in diffs)
    print(f"{label}: {tied_elements / total:.3%} of elements have a threshold-tied entry")
    assert over < TIE_ALLOWANCE * total, (
        f"{label}: {over / total:.3%} of elements beyond one bf16 step from mergekit "
        f"(allowance {TIE_ALLOWANCE:.0%})"
    )


def check_variance_topk_parity(
    label: str,
    raw: dict[str, Any],
    ours: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
    states: dict[str, dict[str, torch.Tensor]],
) -> None:
    """SCE's selection keeps the k = floor(m select_topk) largest variances across the task
    vectors (m: coordinates of non-zero variance; the product in float32). Elements beyond one
    bf16 step are allowed only in tensors whose variances tie at mergekit's k-th largest (there
    the selection, and so the per-tensor weights computed after it, may differ), and in under
    TIE_ALLOWANCE of all elements."""
    diffs = compare(ours, theirs, list(states.values()))
    report(label, diffs, ours)
    topk = raw.get("parameters", {}).get("select_topk", 1.0)
    base_state = states[raw["base_model"]]
    model_states = [states[e["model"]] for e in raw["models"] if e["model"] != raw["base_model"]]
    total = sum(t.numel() for t in ours.values())
    for d in diffs:
        if not d.over:
            continue
        base = base_state[d.name].float().reshape(-1)
        var = torch.stack([m[d.name].float().reshape(-1) - base for m in model_states]).var(0, unbiased=False)
        k = int((torch.tensor(int((var != 0).sum())) * topk).item())
        assert 0 < k < var.numel(), f"{label}: {d.name}: no selection, yet {d.over} elements differ"
        kth = var.sort(descending=True).values[k - 1]
        assert int((var >= kth).sum()) > k, (
            f"{label}: {d.name}: {d.over} elements beyond one bf16 step without a variance tie at "
            "the selection threshold"
        )
    over = sum(d.over for d in diffs)
    assert over < TIE_ALLOWANCE * total, f"{label}: {over / total:.3%} of elements beyond one bf16 step"


def rank_quintiles(delta: torch.Tensor) -> torch.Tensor:
    """0..4: the quintile of each entry's |delta| rank within its row (dim 1; 1-D: one row)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).float()
    return (ranks / max(rows.shape[1] - 1, 1) * 5).long().clamp(max=4).reshape(-1)


def random_merge_statistics(
    out: dict[str, torch.Tensor], base: dict[str, torch.Tensor], first: dict[str, torch.Tensor]
) -> tuple[float, float, list[float]]:
    """(share of elements changed from the base, |out - base|, share changed per rank quintile
    of the first model's task vector)."""
    changed = total = 0
    sq = 0.0
    hits, counts = torch.zeros(5), torch.zeros(5)
    for name, t in out.items():
        d = t.float() - base[name].float()
        moved = (d != 0).reshape(-1)
        changed += int(moved.sum())
        total += d.numel()
        sq += float(d.double().square().sum())
        q = rank_quintiles(first[name].float() - base[name].float())
        hits += torch.zeros(5).index_add_(0, q, moved.float())
        counts += torch.bincount(q, minlength=5).float()
    return changed / total, sq**0.5, (hits / counts).tolist()


def check_random_parity(
    label: str,
    raw: dict[str, Any],
    ours: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
    states: dict[str, dict[str, torch.Tensor]],
) -> None:
    """DELLA draws random masks (mergekit from torch's global generator, weightsmith from the
    seeded per-tensor generators), so one merge from each is compared in distribution: the share
    of elements changed, that share per magnitude-rank quintile (DELLA keeps large magnitudes
    more often) and the norm of the change. The recipes set ``rescale_mode: l1`` (mergekit's
    rescale) so the norms are comparable."""
    assert sorted(ours) == sorted(theirs), f"{label}: key sets differ"
    base = states[raw["base_model"]]
    first = states[raw["models"][0]["model"]]
    a = random_merge_statistics(ours, base, first)
    b = random_merge_statistics(theirs, base, first)
    print(
        f"\n{label} (random, statistics): changed {a[0]:.4f} vs mergekit {b[0]:.4f}; |out - base| "
        f"{a[1]:.4f} vs {b[1]:.4f}; changed by rank quintile {[round(x, 3) for x in a[2]]} vs "
        f"{[round(x, 3) for x in b[2]]}"
    )
    assert abs(a[0] - b[0]) <= CHANGED_TOLERANCE, f"{label}: changed share {a[0]:.4f} vs {b[0]:.4f}"
    assert abs(a[1] - b[1]) <= NORM_TOLERANCE * b[1], f"{label}: |out - base| {a[1]:.4f} vs {b[1]:.4f}"
    for q, (x, y) in enumerate(zip(a[2], b[2])):
        assert abs(x - y) <= RANK_KEEP_TOLERANCE, f"{label}: rank quintile {q}: changed {x:.3f} vs {y:.3f}"


def check_recipe(
    label: str,
    raw: dict[str, Any],
    ours: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
    states: dict[str, dict[str, torch.Tensor]],
) -> None:
    if raw["merge_method"] in TOPK_METHODS:
        check_topk_parity(label, raw, ours, theirs, states)
    elif raw["merge_method"] in VARIANCE_TOPK_METHODS:
        check_variance_topk_parity(label, raw, ours, theirs, states)
    elif raw["merge_method"] in RANDOM_METHODS:
        check_random_parity(label, raw, ours, theirs, states)
    else:
        check_parity(label, ours, theirs, list(states.values()))


def check_loads(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """transformers loads the merged folder with every weight from disk, and runs forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    loaded = model.state_dict()
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), f"{folder}: transformers did not load {name} as written"
    vocab = model.config.vocab_size
    ids = torch.arange(8).remainder(vocab).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], vocab)
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_inputs(tmp_path_factory.mktemp("parity-inputs"))


def load_states(folders: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """Each input's tensors, by the path materialize() puts in the recipe."""
    return {str(folder.resolve()): load_folder(folder) for folder in folders.values()}


@pytest.fixture(scope="module")
def input_states(inputs: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return load_states(inputs)


def test_inputs_match_the_golden_inputs(inputs: dict[str, Path]) -> None:
    assert SPEC.get("sha256"), "inputs.json has no digests: run benchmarks/parity/make_golden.py"
    assert input_digests(inputs) == SPEC["sha256"], (
        "the rebuilt inputs differ from those the goldens were made from (torch RNG or "
        "tests/models.py changed?): regenerate with benchmarks/parity/make_golden.py"
    )


def test_every_recipe_has_a_golden() -> None:
    assert RECIPES
    assert sorted(p.stem for p in RECIPES) == sorted(p.stem for p in GOLDEN.glob("*.safetensors"))


# breadcrumbs' tie enumeration takes ~6x the other recipes: in the slow tier (CI runs it).
GOLDEN_CASES = [
    pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem == "breadcrumbs" else [])
    for p in RECIPES
]


@pytest.mark.parametrize("recipe", GOLDEN_CASES)
def test_matches_mergekit_golden(
    recipe: Path,
    inputs: dict[str, Path],
    input_states: dict[str, dict[str, torch.Tensor]],
    tmp_path: Path,
) -> None:
    raw = materialize(recipe, inputs)
    out = weightsmith.merge(raw, tmp_path / "out", fsync=False).out
    ours = load_folder(out)
    theirs = load_file(str(GOLDEN / f"{recipe.stem}.safetensors"))
    check_recipe(recipe.stem, raw, ours, theirs, input_states)
    check_loads(out, ours)


@pytest.fixture(scope="module")
def live_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Other seeds than the goldens': the live run checks fresh inputs.
    return build_inputs(tmp_path_factory.mktemp("parity-live-inputs"), seed_offset=1000)


@pytest.mark.skipif(not os.environ.get(MERGEKIT_ENV), reason=f"set {MERGEKIT_ENV}=/path/to/mergekit-yaml")
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_matches_mergekit_live(recipe: Path, live_inputs: dict[str, Path], tmp_path: Path) -> None:
    raw = materialize(recipe, live_inputs)
    theirs = load_folder(run_mergekit(os.environ[MERGEKIT_ENV], raw, tmp_path / "mergekit", tmp_path))
    out = weightsmith.merge(raw, tmp_path / "weightsmith", fsync=False).out
    ours = load_folder(out)
    check_recipe(f"{recipe.stem} (live)", raw, ours, theirs, load_states(live_inputs))
    check_loads(out, ours)
