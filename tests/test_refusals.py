"""Inputs weightsmith refuses before any work: an OUT that overlaps an input, mixed integer and
float tensors, non-finite parameters, alias bombs, an unwritable OUT parent, a tensor the
budget cannot hold; and inputs that used to crash (.bin merges, float8 outputs)."""

import os
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from models import LLAMA_CONFIG, load_folder, perturb, random_state, save_model
from safetensors.torch import save_file

import weightsmith
from weightsmith.cli import main
from weightsmith.errors import MergeError, OutputError, RecipeError

Q = "model.layers.0.self_attn.q_proj.weight"


def linear(models, **extra):
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        **extra,
    }


def ta(base, models, **extra):
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
        **extra,
    }


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ item 1: OUT overlaps an input
@pytest.mark.parametrize("where", ["equal", "parent", "inside"])
def test_overwrite_onto_an_input_is_refused_before_any_work(family, tmp_path, where):
    base, models = family
    before = {p: snapshot(p) for p in (base, *models)}
    out = {"equal": models[0], "parent": models[0].parent, "inside": models[0] / "merged"}[where]
    with pytest.raises(OutputError) as e:
        weightsmith.merge(ta(base, models), out, overwrite=True)
    message = str(e.value)
    assert str(out.resolve()) in message and str(models[0].resolve()) in message
    assert {p: snapshot(p) for p in (base, *models)} == before
    assert not (models[0] / "merged").exists()


def test_out_inside_an_input_folder_is_refused_without_overwrite(family):
    base, models = family
    with pytest.raises(OutputError, match="inside the input"):
        weightsmith.merge(ta(base, models), base / "merged")
    assert not (base / "merged").exists()
    assert not [p for p in base.iterdir() if p.name.startswith(".merged")]


def test_overlap_is_found_through_symlinks(family, tmp_path):
    base, models = family
    link = tmp_path / "alias"
    link.symlink_to(models[1])
    before = snapshot(models[1])
    with pytest.raises(OutputError, match="input"):
        weightsmith.merge(ta(base, models), link, overwrite=True)
    assert snapshot(models[1]) == before


def test_overwrite_onto_the_recipe_or_tokenizer_source_is_refused(family, tmp_path):
    base, models = family
    tok = save_model(tmp_path / "tok", random_state(LLAMA_CONFIG, 5), LLAMA_CONFIG, shards=1)
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    recipe = recipe_dir / "r.yaml"
    recipe.write_text(yaml.safe_dump(ta(base, models, tokenizer_source=str(tok))))
    with pytest.raises(OutputError, match="recipe"):
        weightsmith.merge(str(recipe), recipe_dir, overwrite=True)
    assert recipe.exists()
    with pytest.raises(OutputError, match="tokenizer"):
        weightsmith.merge(str(recipe), tok, overwrite=True)
    assert (tok / "model.safetensors").exists()


def test_single_file_model_and_checkpoint_parameter_are_protected(tmp_path):
    state = random_state(LLAMA_CONFIG, 1)
    single = tmp_path / "models" / "one.safetensors"
    single.parent.mkdir()
    save_file(state, str(single))
    other = save_model(tmp_path / "other", perturb(state, 2), LLAMA_CONFIG, shards=1)
    with pytest.raises(OutputError, match="one.safetensors"):
        weightsmith.merge(linear([single, other]), single.parent, overwrite=True)
    with pytest.raises(OutputError, match="one.safetensors"):
        weightsmith.merge(linear([single, other]), single, overwrite=True)
    assert single.exists()
    # beside a single file (not a model folder) is fine
    weightsmith.merge(linear([single, other]), single.parent / "out")
    assert (single.parent / "out" / "model.safetensors.index.json").exists()
    mask = tmp_path / "masks"
    mask.mkdir()
    save_file({k: torch.ones(v.shape) for k, v in state.items()}, str(mask / "mask.safetensors"))
    recipe = {
        "merge_method": "graft",
        "base_model": str(other),
        "models": [str(save_model(tmp_path / "ft", perturb(state, 3), LLAMA_CONFIG, shards=1))],
        "parameters": {"mask": str(mask / "mask.safetensors")},
    }
    with pytest.raises(OutputError, match="mask.safetensors"):
        weightsmith.merge(recipe, mask, overwrite=True)
    assert (mask / "mask.safetensors").exists()


def test_hub_snapshot_inputs_are_protected(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    sha = "0123456789abcdef0123456789abcdef01234567"
    state = random_state(LLAMA_CONFIG, 3)
    snapshots = []
    for repo_id, s in (("acme/base", state), ("acme/ft", perturb(state, 9))):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshots.append(save_model(repo / "snapshots" / sha, s, LLAMA_CONFIG, shards=1))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(sha)
    # as huggingface_hub lays it out: the snapshot's file is a link into blobs/
    blobs = cache / "models--acme--ft" / "blobs"
    blobs.mkdir()
    blob = blobs / ("a" * 64)
    (snapshots[1] / "model.safetensors").rename(blob)
    (snapshots[1] / "model.safetensors").symlink_to(blob)
    recipe = ta("acme/base", ["acme/ft"])
    with pytest.raises(OutputError, match="acme/ft"):
        weightsmith.merge(recipe, cache, overwrite=True)
    with pytest.raises(OutputError, match="a" * 64):
        weightsmith.merge(recipe, blobs, overwrite=True)
    assert blob.exists()
    with pytest.raises(OutputError, match="inside the input model 'acme/base'"):
        weightsmith.merge(recipe, snapshots[0] / "out")
    assert all((s / "model.safetensors").exists() for s in snapshots)


def test_lazy_save_onto_an_input_is_refused(family):
    base_dir, models = family
    base = weightsmith.Checkpoint.open(base_dir)
    ft = weightsmith.Checkpoint.open(models[0])
    before = snapshot(base_dir)
    with pytest.raises(OutputError, match="input"):
        (base + 0.5 * (ft - base)).save(base_dir, overwrite=True)
    assert snapshot(base_dir) == before


def test_cli_refuses_overwrite_of_the_inputs_folder(family, tmp_path):
    base, models = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(ta(base, models)))
    res = CliRunner().invoke(main, ["merge", str(recipe), str(base.parent), "--overwrite", "-q"])
    assert res.exit_code == 5 and "Traceback" not in res.output
    assert str(base.parent.resolve()) in res.output
    assert (base / "config.json").exists()


# ------------------------------------------------------------------ item 2: integer among floats
def test_integer_tensor_in_a_fine_tune_is_refused(tmp_path):
    state = random_state(LLAMA_CONFIG, 1)
    base = save_model(tmp_path / "base", state, LLAMA_CONFIG)
    odd = perturb(state, 2)
    odd[Q] = torch.zeros(odd[Q].shape, dtype=torch.int32)
    ft = save_model(tmp_path / "ft", odd, LLAMA_CONFIG)
    with pytest.raises(MergeError) as e:
        weightsmith.plan_merge(ta(base, [ft]))
    message = str(e.value)
    assert Q in message and "int32" in message and "bfloat16" in message and str(ft) in message


def test_integer_tensor_in_the_base_is_refused(tmp_path):
    state = random_state(LLAMA_CONFIG, 1)
    odd = dict(state)
    odd[Q] = torch.zeros(state[Q].shape, dtype=torch.int32)
    base = save_model(tmp_path / "base", odd, LLAMA_CONFIG)
    ft = save_model(tmp_path / "ft", perturb(state, 2), LLAMA_CONFIG)
    with pytest.raises(MergeError) as e:
        weightsmith.plan_merge(ta(base, [ft]))
    assert Q in str(e.value) and "int32" in str(e.value) and str(base) in str(e.value)


def test_integer_buffers_integer_everywhere_are_copied_from_the_base(tmp_path):
    state = random_state(LLAMA_CONFIG, 1)
    state["model.position_ids"] = torch.arange(8, dtype=torch.int64)
    ft_state = perturb(state, 2)
    ft_state["model.position_ids"] = torch.arange(8, dtype=torch.int64) * 3
    base = save_model(tmp_path / "base", state, LLAMA_CONFIG)
    ft = save_model(tmp_path / "ft", ft_state, LLAMA_CONFIG)
    weightsmith.merge(ta(base, [ft]), tmp_path / "out")
    out = load_folder(tmp_path / "out")
    assert torch.equal(out["model.position_ids"], state["model.position_ids"])


# ------------------------------------------------------------------ item 6: --allow-pickle merges
def test_pickle_merge_end_to_end(tmp_path):
    a = random_state(LLAMA_CONFIG, 1, dtype=torch.float32)
    b = perturb(a, 2)
    for name, state in (("a", a), ("b", b)):
        folder = tmp_path / name
        folder.mkdir()
        torch.save(state, folder / "pytorch_model.bin")
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(tmp_path / n), "parameters": {"weight": 0.5}} for n in "ab"],
        "dtype": "float32",
    }
    result = weightsmith.merge(recipe, tmp_path / "out", allow_pickle=True)
    out = load_folder(result.out)
    assert set(out) == set(a)
    for k in a:
        assert torch.allclose(out[k], 0.5 * a[k] + 0.5 * b[k], atol=1e-6), k
    report = (result.out / "merge_report.json").read_text()
    assert "pytorch_model.bin" in report


# ------------------------------------------------------------------ item 7: float8 outputs
F8 = torch.float8_e4m3fn


def test_float8_out_dtype(family, tmp_path):
    base, models = family
    weightsmith.merge(ta(base, models, out_dtype="float8_e4m3fn"), tmp_path / "out")
    out = load_folder(tmp_path / "out")
    assert out[Q].dtype == F8
    b = load_folder(base)[Q].float()
    expected = b + sum(0.5 * (load_folder(m)[Q].float() - b) for m in models)
    # e4m3: 3 mantissa bits, so rounding is within 1/16 relative (plus the subnormal step)
    assert ((out[Q].float() - expected).abs() <= expected.abs() / 16 + 2**-9).all()


def test_float8_base_without_dtype(tmp_path):
    state = {k: v.to(F8) for k, v in random_state(LLAMA_CONFIG, 1, dtype=torch.float32).items()}
    a = save_model(tmp_path / "a", state, LLAMA_CONFIG, shards=1)
    b = save_model(tmp_path / "b", state, LLAMA_CONFIG, shards=1)
    weightsmith.merge(linear([a, b], parameters={"normalize": False}), tmp_path / "out")
    out = load_folder(tmp_path / "out")
    assert all(v.dtype == F8 for v in out.values())
    # two equal inputs weighted 1 + 1: twice the value, exactly representable in float8
    assert torch.equal(out[Q].float(), 2 * state[Q].float())


def test_float8_overflow_is_reported(tmp_path):
    state = {k: v.to(F8) for k, v in random_state(LLAMA_CONFIG, 1, dtype=torch.float32).items()}
    state[Q] = torch.full(state[Q].shape, 400.0).to(F8)
    a = save_model(tmp_path / "a", state, LLAMA_CONFIG, shards=1)
    b = save_model(tmp_path / "b", state, LLAMA_CONFIG, shards=1)
    with pytest.raises(MergeError, match="overflow float8_e4m3fn"):
        weightsmith.merge(linear([a, b], parameters={"normalize": False}), tmp_path / "out")


# ------------------------------------------------------------------ item 8: OUT parent, budget
def test_unwritable_out_parent_gives_a_message(family, tmp_path, monkeypatch):
    base, models = family
    parent = tmp_path / "locked"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **k: False if Path(p) == parent else real_access(p, mode, **k)
    )
    with pytest.raises(OutputError) as e:
        weightsmith.merge(ta(base, models), parent / "out")
    assert str(parent) in str(e.value) and "permission" in str(e.value).lower()


def test_permission_error_creating_out_gives_a_message(family, tmp_path, monkeypatch):
    base, models = family
    real_mkdir = Path.mkdir

    def denied(self, *a, **k):
        if "locked" in str(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", denied)
    res = CliRunner().invoke(main, ["merge", _recipe_file(tmp_path, ta(base, models)),
                                    str(tmp_path / "locked" / "out"), "-q"])
    assert res.exit_code == 5 and "Traceback" not in res.output, res.output
    assert "locked" in res.output


def _recipe_file(tmp_path, recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_tensor_over_budget_that_cannot_be_split_is_refused_up_front(family, tmp_path):
    base, models = family
    recipe = {
        "merge_method": "slerp",
        "base_model": str(base),
        "models": [str(models[0])],
        "parameters": {"t": 0.5},
    }
    plan = weightsmith.plan_merge(recipe, memory_budget="4KB")
    assert plan.oversize
    with pytest.raises(MergeError) as e:
        weightsmith.merge(recipe, tmp_path / "out", memory_budget="4KB")
    message = str(e.value)
    assert "--memory-budget" in message and plan.oversize[0] in message
    needed = int(message.split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert needed == plan.peak_estimate > 4096
    assert not (tmp_path / "out").exists()
    # the budget the message names is enough
    suggested = message.split("--memory-budget ")[1].split(" ")[0]
    weightsmith.merge(recipe, tmp_path / "out", memory_budget=suggested)
    assert (tmp_path / "out" / "config.json").exists()
    res = CliRunner().invoke(main, ["plan", _recipe_file(tmp_path, recipe), "--memory-budget", "4KB"])
    assert res.exit_code == 0 and "merge will refuse" in res.output
    assert f"--memory-budget {suggested}" in res.output


# ------------------------------------------------------------------ item 9: recipe values
@pytest.mark.parametrize(
    ("models_params", "global_params", "field"),
    [
        ({"weight": float("nan")}, {}, "models[0] (m).parameters.weight"),
        ({"weight": 0.5}, {"lambda": float("inf")}, "parameters.lambda"),
        ({"weight": [0.1, float("-inf")]}, {}, "models[0] (m).parameters.weight"),
        ({"weight": [{"filter": "mlp", "value": float("nan")}, {"value": 1}]}, {},
         "models[0] (m).parameters.weight[0].value"),
        ({"weight": "1e999"}, {}, "models[0] (m).parameters.weight"),
    ],
)
def test_non_finite_parameters_are_refused_at_load(models_params, global_params, field):
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "b",
        "models": [{"model": "m", "parameters": models_params}],
        "parameters": global_params,
    }
    with pytest.raises(RecipeError) as e:
        weightsmith.load_recipe(recipe)
    assert field in str(e.value) and "finite" in str(e.value)  # models[0] named by its path too


def test_non_finite_word_for_a_numeric_parameter_is_refused_at_plan(family):
    base, models = family
    with pytest.raises(RecipeError) as e:
        weightsmith.plan_merge(ta(base, models[:1], parameters={"lambda": "Infinity"}))
    assert "`lambda` must be a finite number" in str(e.value)
    recipe = ta(base, models[:1])
    recipe["models"][0]["parameters"]["weight"] = "nan"
    with pytest.raises(RecipeError) as e:
        weightsmith.plan_merge(recipe)
    assert "`weight` must be a finite number" in str(e.value) and str(models[0]) in str(e.value)


def test_yaml_nan_is_refused_from_text():
    text = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: .nan}\n"
    with pytest.raises(RecipeError, match="weight.*finite"):
        weightsmith.load_recipe(text)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", ["a", "b"]),
        ("name", 3),
        ("tokenizer_source", {"x": 1}),
        ("tokenizer_source", 7),
        ("vocab_policy", ["pad"]),
        ("chat_template", ["auto"]),
    ],
)
def test_recipe_fields_are_type_checked(field, value):
    recipe = {"merge_method": "linear", "models": ["a", "b"], field: value}
    with pytest.raises(RecipeError, match=field):
        weightsmith.load_recipe(recipe)


def test_parameter_names_must_be_strings():
    recipe = {"merge_method": "linear", "models": [{"model": "a", "parameters": {1: 2}}]}
    with pytest.raises(RecipeError, match="parameter names"):
        weightsmith.load_recipe(recipe)


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_alias_bomb_is_refused_with_bounded_memory(tmp_path):
    text = BOMB.replace("a: &a", "merge_method: linear\nmodels: [x, y]\nname: &n\n  a: &a").replace(
        "\nb:", "\n  b:").replace("\nc:", "\n  c:").replace("\nd:", "\n  d:").replace(
        "\ne:", "\n  e:").replace("\nf:", "\n  f:").replace("\ng:", "\n  g:").replace(
        "\nh:", "\n  h:").replace("\ni:", "\n  i:")
    assert len(text.encode()) < 1000
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError, match="expands to more than"):
            weightsmith.load_recipe(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20
    res = CliRunner().invoke(main, ["plan", str(path)])
    assert res.exit_code == 2 and "expands to more than" in res.output


def test_recursive_alias_is_refused():
    text = "merge_method: linear\nmodels: [x, y]\nname: &n [*n]\n"
    with pytest.raises(RecipeError):
        weightsmith.load_recipe(text)
