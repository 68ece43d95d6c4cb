"""Multi-stage recipes (mergekit-multi): stages run in dependency order, intermediates are cached
and reused while their recipe and inputs are unchanged, the final stage goes to OUT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from models import load_folder

import weightsmith
from weightsmith.cli import main
from weightsmith.errors import RecipeError
from weightsmith.stages import STAGE_CACHE, load_stages, plan_stages

CORPUS = Path(__file__).parent / "recipes_in_the_wild"


def three_stages(base: Path, models: list[Path], w_first: float = 0.5) -> str:
    # The final (unnamed) document first and `second` before `first`: order comes from the uses.
    return f"""\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: second
    parameters: {{weight: 1.0}}
dtype: float32
---
name: second
merge_method: linear
models:
  - model: first
    parameters: {{weight: 0.5}}
  - model: {models[2]}
    parameters: {{weight: 0.5}}
dtype: float32
---
name: first
merge_method: linear
models:
  - model: {models[0]}
    parameters: {{weight: {w_first}}}
  - model: {models[1]}
    parameters: {{weight: {1 - w_first}}}
dtype: float32
"""


def files_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_stages_run_in_dependency_order_and_final_goes_to_out(family, tmp_path):
    base, models = family
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(three_stages(base, models))
    staged = load_stages(recipe)
    assert [s.name for s in staged.stages] == ["first", "second", None]
    assert [s.needs for s in staged.stages] == [[], ["first"], ["second"]]

    out = tmp_path / "out" / "merged"
    result = weightsmith.merge(str(recipe), out)
    assert result.out == out.resolve() or result.out == out
    cache = tmp_path / "out" / STAGE_CACHE  # OUT's sibling by default
    folders = sorted(p.name for p in cache.iterdir())
    assert [f.split("-")[0] for f in folders] == ["first", "second"]
    assert [o.stage.name for o in result.stages] == ["first", "second", None]

    # The numbers: first = (m0 + m1) / 2, second = (first + m2) / 2, final = base + (second - base).
    ins = [load_folder(m) for m in models]
    got = load_folder(out)
    name = "model.layers.1.mlp.up_proj.weight"
    first = 0.5 * ins[0][name].float() + 0.5 * ins[1][name].float()
    second = 0.5 * first + 0.5 * ins[2][name].float()
    assert torch.allclose(got[name].float(), second, atol=1e-6)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["inputs"][1]["path"].startswith(str(cache))  # the final stage read `second`'s folder
    # OUT keeps the whole multi-stage recipe: running it again reproduces OUT, stages included.
    assert (out / "weightsmith_recipe.yaml").read_text() == recipe.read_text()


def test_rerun_reuses_unchanged_stages_and_a_changed_stage_invalidates(family, tmp_path):
    base, models = family
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(three_stages(base, models))
    cache = tmp_path / "stages"
    first_out = weightsmith.merge(str(recipe), tmp_path / "a", stage_cache=cache)
    assert not any(o.reused for o in first_out.stages)
    before = {o.stage.name: (o.out, files_state(o.out)) for o in first_out.stages[:-1]}

    again = weightsmith.merge(str(recipe), tmp_path / "b", stage_cache=cache)
    assert [o.reused for o in again.stages] == [True, True, False]
    for o in again.stages[:-1]:
        folder, state = before[o.stage.name]
        assert o.out == folder and files_state(folder) == state  # not rewritten
    a, b = load_folder(tmp_path / "a"), load_folder(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Changing `first` changes its key, and so the key of `second`, which reads it.
    recipe.write_text(three_stages(base, models, w_first=0.25))
    changed = weightsmith.merge(str(recipe), tmp_path / "c", stage_cache=cache)
    assert [o.reused for o in changed.stages] == [False, False, False]
    assert all(o.out != before[o.stage.name][0] for o in changed.stages[:-1])
    assert len(list(cache.iterdir())) == 4  # the old intermediates stay (another recipe may use them)
    c = load_folder(tmp_path / "c")
    assert not torch.equal(a["model.layers.1.mlp.up_proj.weight"], c["model.layers.1.mlp.up_proj.weight"])


def test_stage_option_and_plan(family, tmp_path):
    base, models = family
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(three_stages(base, models))
    cache = tmp_path / "stages"
    rows = plan_stages(recipe, stage_cache=cache)
    planned = [(r.stage.name, r.plan is not None) for r in rows]
    assert planned == [("first", True), ("second", False), (None, False)]
    runner = CliRunner()
    res = runner.invoke(main, ["plan", str(recipe), "--stage-cache", str(cache)])
    assert res.exit_code == 0, res.output
    assert "stage 1/3 `first`: linear of 2 model(s); uses stages: -; to run, into" in res.output
    assert "stage 3/3 (final, unnamed): task_arithmetic of 1 model(s); uses stages: second;" in res.output

    res = runner.invoke(main, ["merge", str(recipe), str(tmp_path / "first"), "--stage", "first",
                               "--stage-cache", str(cache), "-q"])
    assert res.exit_code == 0, res.output
    assert not cache.exists()  # `first` is the target: written to OUT, nothing cached
    res = runner.invoke(main, ["merge", str(recipe), str(tmp_path / "out"), "--stage-cache", str(cache)])
    assert res.exit_code == 0, res.output
    assert "stage 1/3 `first`: merged into" in res.output
    assert "stage 3/3 (final, unnamed): merged into" in res.output
    res = runner.invoke(main, ["plan", str(recipe), "--stage-cache", str(cache)])
    assert "stage 2/3 `second`: linear of 2 model(s); uses stages: first; cached in" in res.output
    assert "tensors:" in res.output  # the final stage's own plan, now that its inputs exist
    res = runner.invoke(main, ["plan", str(recipe), "--stage", "secnd"])
    assert res.exit_code == 2 and "no such stage; did you mean `second`?" in res.output


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("name: a\nmerge_method: linear\nmodels: [{model: b}]\n---\n"
         "name: b\nmerge_method: linear\nmodels: [{model: a}]\n",
         "stages form a cycle: `a` -> `b` -> `a`"),
        ("name: a\nmerge_method: linear\nmodels: [{model: b}]\n---\n"
         "name: b\nmerge_method: linear\nmodels: [{model: a}]\n---\n"
         "name: c\nmerge_method: linear\nmodels: [{model: org/x}]\n",
         "stages form a cycle: `a` -> `b` -> `a`"),  # even where the target does not use them
        ("name: first\nmerge_method: linear\nmodels: [{model: org/x}]\n---\n"
         "merge_method: linear\nmodels: [{model: frist}, {model: org/y}]\n",
         "uses `frist`, which is no stage of this recipe and no local folder; did you mean `first`?"),
        ("name: a\nmerge_method: linear\nmodels: [{model: org/x}]\n---\n"
         "name: a\nmerge_method: linear\nmodels: [{model: org/y}]\n", "two stages are named `a`"),
        ("merge_method: linear\nmodels: [{model: org/x}]\n---\n"
         "merge_method: linear\nmodels: [{model: org/y}]\n", "more than one document has no `name:`"),
        ("name: a\nmerge_method: linear\nmodels: [{model: org/x}]\ndype: float32\n---\n"
         "merge_method: linear\nmodels: [{model: a}]\n", "did you mean `dtype`?"),  # under --strict
        ("name: a\nmerge_method: linear\nmodels: [org/x]\n---\nmerge_method: linear\nmodels: [a]\n",
         "stage `a`: models[0] (org/x): `linear` needs `weight`"),
        ("name: a\nmerge_method: linear\nmodels: [org/x]\nparameters: {weight: 1}\n---\n"
         "merge_method: task_arithmetic\n"
         "base_model: org/b\nmodels: [{model: a, parameters: {weight: 1, wieght: 2}}]\n",
         "takes no parameter `wieght`"),  # a later stage's parameters are checked before stage a runs
        ("name: first\nmerge_method: linear\nmodels: [org/x]\n---\n"
         "merge_method: linear\nmodels: [frist, org/y]\n",  # the short form of `models:`
         "uses `frist`, which is no stage"),
    ],
)
def test_bad_stage_graphs_fail_before_any_work(tmp_path, text, fragment):
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError) as e:
        weightsmith.merge(str(recipe), tmp_path / "out", strict=True)
    assert fragment in str(e.value)
    assert not (tmp_path / STAGE_CACHE).exists() and not (tmp_path / "out").exists()


def test_multi_document_is_refused_by_the_one_recipe_loader(tmp_path):
    with pytest.raises(RecipeError, match="several YAML documents .* `weightsmith merge`"):
        weightsmith.load_recipe("name: a\nmerge_method: linear\nmodels: [x]\n---\nmerge_method: linear\n"
                                "models: [a]\n")


def test_corpus_multi_document_recipe_stage_graph():
    """021 (mergekit-multi, KansenSakura): two named nuslerp stages feed a passthrough stack."""
    path = CORPUS / "021-kansensakura-multi-nuslerp-passthrough.yaml"
    for name in ("knowledge_core", "rp_blend"):
        staged = load_stages(path, stage=name)
        assert [s.name for s in staged.stages] == [name]
    from weightsmith.stages import documents

    _, docs = documents(path)
    assert [d.get("name") for d in docs] == ["knowledge_core", "rp_blend", None]
    from weightsmith.stages import _stage_refs

    assert _stage_refs(docs[2], {"knowledge_core", "rp_blend"}) == {"knowledge_core", "rp_blend"}


def test_plan_and_merge_agree_on_stage_keys(family, tmp_path):
    # `plan` must name the folder `merge` wrote, with the options that change bytes (shard size,
    # numerics) in the key and the others (threads, progress, memory budget; the seed of a
    # method without randomness, like linear) out of it.
    base, models = family
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(three_stages(base, models))
    cache = tmp_path / "stages"
    opts = {"out_shard_size": "300KB", "random_seed": 7}
    merged = weightsmith.merge(str(recipe), tmp_path / "out", stage_cache=cache, threads=1, **opts)
    written = [o.out for o in merged.stages[:-1]]
    same = plan_stages(recipe, stage_cache=cache, threads=2, progress=True, memory_budget="2GB",
                       device="cpu-staged", **opts)  # cpu-staged writes the CPU's bytes
    assert [(r.folder, r.cached) for r in same[:-1]] == [(w, True) for w in written]
    assert same[-1].plan is not None  # the final stage is planned from the cached intermediates
    assert plan_stages(recipe, stage_cache=cache, **{**opts, "random_seed": 8})[0].cached
    for changed in ({"out_shard_size": "5GB"}, {"numerics": "mergekit"}):
        rows = plan_stages(recipe, stage_cache=cache, **{**opts, **changed})
        assert rows[0].folder != written[0] and not rows[0].cached, changed
    res = CliRunner().invoke(main, ["plan", str(recipe), "--stage-cache", str(cache),
                                    "--out-shard-size", "300KB", "--random-seed", "7"])
    assert res.exit_code == 0, res.output
    assert f"stage 1/3 `first`: linear of 2 model(s); uses stages: -; cached in {written[0]}" in res.output
    again = weightsmith.merge(str(recipe), tmp_path / "again", stage_cache=cache, progress=False, **opts)
    assert [o.reused for o in again.stages] == [True, True, False]


def test_byte_route_keeps_only_what_changes_bytes():
    from weightsmith.engine.device_choice import DeviceChoice
    from weightsmith.resume import byte_route

    cpu, staged = DeviceChoice("cpu"), DeviceChoice("cpu-staged", "cupy", 1 << 20)
    assert byte_route(cpu) == byte_route(staged) == {"device": "cpu", "kernels": None}
    on_gpu = DeviceChoice("cuda:1", "torch", 1 << 30)
    assert byte_route(DeviceChoice("cuda:0")) == byte_route(on_gpu) == {"device": "cuda", "kernels": "torch"}
    assert byte_route(DeviceChoice("cuda", "cupy")) != byte_route(DeviceChoice("cuda", "torch"))
