"""End-to-end merges: outputs, side files, atomicity and every unclean-input error."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from click.testing import CliRunner
from models import LLAMA_CONFIG, load_folder, perturb, random_state, save_model

import weightsmith
from weightsmith.cli import main
from weightsmith.errors import CheckpointError, MergeError, OutputError, RecipeError


def ta_recipe(base, models, weights=(0.5, -0.3, [0.1, 1.0]), lam=0.8, **extra):
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)],
        "parameters": {"lambda": lam},
        "dtype": "float32",
        "out_dtype": "bfloat16",
        **extra,
    }


def no_leftovers(parent, name="out"):
    return not [p for p in parent.iterdir() if p.name.startswith(f".{name}.weightsmith")]


def test_task_arithmetic_end_to_end_matches_formula(family, tmp_path):
    base, models = family
    out = tmp_path / "out"
    result = weightsmith.merge(ta_recipe(base, models), out, out_shard_size="30KB")
    merged, b = load_folder(out), load_folder(base)
    fts = [load_folder(m) for m in models]
    layers = LLAMA_CONFIG["num_hidden_layers"]
    for name, value in merged.items():
        t = 0.0
        if ".layers." in name:
            t = int(name.split(".")[2]) / (layers - 1)
        w3 = 0.1 + 0.9 * t
        delta = sum(w * (f[name].float() - b[name].float()) for w, f in zip((0.5, -0.3, w3), fts))
        expected = (b[name].float() + 0.8 * delta).bfloat16()
        assert value.dtype == torch.bfloat16
        assert (value.float() - expected.float()).abs().max() <= 2 ** -7 * expected.float().abs().max()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in merged.values())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert (out / "tokenizer_config.json").exists()
    assert yaml.safe_load((out / "weightsmith_recipe.yaml").read_text())["merge_method"] == "task_arithmetic"
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and "sampled fingerprint" in card and "fingerprint sha256" not in card
    # same architecture, same headers: the sampled data still tells the inputs apart
    shards = [s for m in models for s in weightsmith.Checkpoint.open(m).provenance()["shards"]]
    prints = {s["sampled_fingerprint"] for s in shards}
    assert len(prints) == 2 * len(models)
    assert json.loads((out / "merge_report.json").read_text())["tensors"] == len(merged)
    assert result.stats.bytes_written == index["metadata"]["total_size"]
    assert no_leftovers(tmp_path)


def test_identity_merges_are_bit_exact(family, tmp_path):
    base, models = family
    one = {"merge_method": "linear", "models": [{"model": str(models[0]), "parameters": {"weight": 1.0}}]}
    weightsmith.merge(one, tmp_path / "lin")
    ft = load_folder(models[0])
    assert all(torch.equal(v, ft[k]) for k, v in load_folder(tmp_path / "lin").items())
    zero = ta_recipe(base, models, lam=0.0)
    del zero["out_dtype"]
    weightsmith.merge(zero, tmp_path / "ta0")
    b = load_folder(base)
    assert all(torch.equal(v, b[k]) for k, v in load_folder(tmp_path / "ta0").items())
    single = ta_recipe(base, models[:1], weights=(1.0,), lam=1.0)
    weightsmith.merge(single, tmp_path / "ta1")
    assert all(torch.equal(v, ft[k]) for k, v in load_folder(tmp_path / "ta1").items())


def test_row_blocks_give_the_same_bytes_as_whole_tensors(family, tmp_path):
    base, models = family
    weightsmith.merge(ta_recipe(base, models), tmp_path / "big", memory_budget="1GB")
    small = weightsmith.merge(ta_recipe(base, models), tmp_path / "small", memory_budget="6KB")
    assert len(small.plan.units) > 2 * len(small.plan.tasks)  # really split
    a, b = load_folder(tmp_path / "big"), load_folder(tmp_path / "small")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_output_is_refused_without_overwrite(family, tmp_path):
    base, models = family
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="--overwrite"):
        weightsmith.merge(ta_recipe(base, models), out)
    assert (out / "keep.txt").read_text() == "mine"
    weightsmith.merge(ta_recipe(base, models), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert no_leftovers(tmp_path)


def test_interrupt_leaves_no_output(family, tmp_path, monkeypatch):
    import weightsmith.engine.executor as ex

    calls = {"n": 0}
    real = ex._compute

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ex, "_compute", interrupted)
    base, models = family
    with pytest.raises(KeyboardInterrupt):
        weightsmith.merge(ta_recipe(base, models), tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_sigterm_from_cli_leaves_no_output(family, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    base, models = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(ta_recipe(base, models)))
    # A slow writer makes the merge last long enough to be interrupted mid-way.
    code = (
        "import time, weightsmith.io.writer as w\n"
        "real = w.ShardWriter.write\n"
        "def slow(*a, **k):\n    time.sleep(0.2); return real(*a, **k)\n"
        "w.ShardWriter.write = slow\n"
        "from weightsmith.cli import main\nmain()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "merge", str(recipe), str(tmp_path / "out"), "-q"],
        stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_disk_full_at_reservation_and_during_write(family, tmp_path, monkeypatch):
    base, models = family

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutputError, match="disk full"):
        weightsmith.merge(ta_recipe(base, models), tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)
    monkeypatch.undo()

    import weightsmith.io.writer as writer_mod

    real_pwrite = os.pwrite
    count = {"n": 0}

    def pwrite(fd, data, offset):
        count["n"] += 1
        if count["n"] > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer_mod.os, "pwrite", pwrite)
    with pytest.raises(OutputError, match="disk full"):
        weightsmith.merge(ta_recipe(base, models), tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_nan_produced_names_the_tensor_and_the_culprit_model(family, tmp_path):
    base, models = family
    state = load_folder(models[1])
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    bad = save_model(tmp_path / "bad", state, LLAMA_CONFIG, shards=2)
    with pytest.raises(MergeError) as e:
        weightsmith.merge(ta_recipe(base, [models[0], bad, models[2]]), tmp_path / "out")
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and str(bad) in msg and "NaN" in msg
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_overflow_in_output_dtype_is_reported(family, tmp_path):
    base, models = family
    recipe = ta_recipe(base, models, lam=1e38, out_dtype="float16")
    with pytest.raises(MergeError, match="NaN/Inf|overflow"):
        weightsmith.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_and_shape_mismatch_name_model_and_tensor(family, tmp_path):
    base, models = family
    state = load_folder(models[0])
    del state["model.layers.0.mlp.down_proj.weight"]
    missing = save_model(tmp_path / "missing", state, LLAMA_CONFIG, shards=1)
    with pytest.raises(MergeError) as e:
        weightsmith.merge(ta_recipe(base, [missing]), tmp_path / "out")
    assert "model.layers.0.mlp.down_proj.weight" in str(e.value) and "missing" in str(e.value)

    state = load_folder(models[0])
    state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 40, dtype=torch.bfloat16)
    wrong = save_model(tmp_path / "wrong", state, LLAMA_CONFIG, shards=1)
    with pytest.raises(MergeError) as e:
        weightsmith.merge(ta_recipe(base, [wrong]), tmp_path / "out")
    assert "model.layers.0.mlp.down_proj.weight" in str(e.value) and "[32, 40]" in str(e.value)
    assert "model.safetensors" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_extra_keys_error_unless_ignored(family, tmp_path):
    base, models = family
    state = load_folder(models[0])
    state["classifier.weight"] = torch.zeros(2, 32, dtype=torch.bfloat16)
    extra = save_model(tmp_path / "extra", state, LLAMA_CONFIG, shards=1)
    with pytest.raises(MergeError, match="classifier.weight.*extra_keys: ignore"):
        weightsmith.merge(ta_recipe(base, [extra]), tmp_path / "out")
    weightsmith.merge(ta_recipe(base, [extra], extra_keys="ignore"), tmp_path / "out")
    assert "classifier.weight" not in load_folder(tmp_path / "out")


def test_vocab_mismatch_error_pad_and_truncate(family, tmp_path):
    base, models = family
    config = dict(LLAMA_CONFIG, vocab_size=70)
    state = load_folder(models[0])
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], torch.full((6, 32), 0.5, dtype=torch.bfloat16)])
    grown = save_model(tmp_path / "grown", state, config, shards=1)
    with pytest.raises(MergeError) as e:
        weightsmith.merge(ta_recipe(base, [grown], weights=(1.0,)), tmp_path / "out")
    assert "vocab_policy" in str(e.value) and "70 rows" in str(e.value)
    weightsmith.merge(ta_recipe(base, [grown], weights=(1.0,), lam=1.0, vocab_policy="pad"), tmp_path / "pad")
    padded = load_folder(tmp_path / "pad")
    assert padded["model.embed_tokens.weight"].shape == (70, 32)
    # base rows are zero-padded, so the new tokens' delta is the fine-tune's row itself
    assert torch.equal(padded["model.embed_tokens.weight"][64:], state["model.embed_tokens.weight"][64:])
    assert json.loads((tmp_path / "pad" / "config.json").read_text())["vocab_size"] == 70
    weightsmith.merge(
        ta_recipe(base, [grown], weights=(1.0,), lam=1.0, vocab_policy="truncate"), tmp_path / "cut"
    )
    cut = load_folder(tmp_path / "cut")
    assert torch.equal(cut["lm_head.weight"], state["lm_head.weight"][:64])


def test_integer_tensors_copied_from_base_and_tied_embeddings(tmp_path):
    config = dict(LLAMA_CONFIG, tie_word_embeddings=True)
    base_state = random_state(config, seed=0)
    base_state["model.rotary.position_ids"] = torch.arange(16)
    base = save_model(tmp_path / "base", base_state, config, shards=1)
    ft_state = {k: v.clone() for k, v in base_state.items()}
    ft_state["model.rotary.position_ids"] = torch.arange(16) * 5  # must not be merged
    ft_state["model.norm.weight"] = ft_state["model.norm.weight"] * 2
    ft = save_model(tmp_path / "ft", ft_state, config, shards=1)
    weightsmith.merge(ta_recipe(base, [ft], weights=(0.5,), lam=1.0), tmp_path / "out")
    out = load_folder(tmp_path / "out")
    assert torch.equal(out["model.rotary.position_ids"], torch.arange(16))
    assert "lm_head.weight" not in out  # tied in the base, so tied in the output


def test_tied_lm_head_read_from_embeddings_when_an_input_ties(tmp_path):
    base_state = random_state(LLAMA_CONFIG, seed=0)
    base = save_model(tmp_path / "base", base_state, LLAMA_CONFIG, shards=1)
    tied_cfg = dict(LLAMA_CONFIG, tie_word_embeddings=True)
    ft_state = {k: v for k, v in base_state.items() if k != "lm_head.weight"}
    ft = save_model(tmp_path / "ft", ft_state, tied_cfg, shards=1)
    weightsmith.merge(ta_recipe(base, [ft], weights=(1.0,), lam=1.0), tmp_path / "out")
    out = load_folder(tmp_path / "out")
    assert torch.equal(out["lm_head.weight"], base_state["model.embed_tokens.weight"])


def test_recipe_errors_before_any_work(family, tmp_path):
    base, models = family
    bad = ta_recipe(base, models)
    bad["parameters"]["lamda"] = 1
    # What mergekit ignores is an error under strict (a warning otherwise: test_leniency.py).
    with pytest.raises(RecipeError, match="no parameter `lamda`.*did you mean `lambda`"):
        weightsmith.merge(bad, tmp_path / "out", strict=True)
    bad = ta_recipe(base, models)
    bad["models"][0]["parameters"]["lambda"] = 1
    with pytest.raises(RecipeError, match="move it to the top-level"):
        weightsmith.merge(bad, tmp_path / "out", strict=True)
    bad = ta_recipe(base, models)
    del bad["base_model"]
    with pytest.raises(RecipeError, match="needs a base_model"):
        weightsmith.merge(bad, tmp_path / "out")
    bad = ta_recipe(base, models)
    del bad["models"][1]["parameters"]
    with pytest.raises(RecipeError, match="needs `weight` for every model"):
        weightsmith.merge(bad, tmp_path / "out")
    bad = ta_recipe(base, models)
    bad["merge_method"] = "tie"
    with pytest.raises(RecipeError, match="unknown merge_method 'tie'"):
        weightsmith.merge(bad, tmp_path / "out")
    bad = ta_recipe(base, models)
    bad["models"][0]["model"] = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="nowhere"):
        weightsmith.merge(bad, tmp_path / "out")
    wise = {"merge_method": "wise_ft", "base_model": str(base),
            "models": [str(m) for m in models[:2]]}
    with pytest.raises(RecipeError, match="exactly 1 model"):
        weightsmith.merge(wise, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_listed_among_models_is_dropped_for_task_methods(family, tmp_path):
    base, models = family
    recipe = ta_recipe(base, models[:1], weights=(1.0,), lam=1.0)
    recipe["models"].insert(0, {"model": str(base)})  # as mergekit users often write it
    weightsmith.merge(recipe, tmp_path / "out")
    ft = load_folder(models[0])
    assert all(torch.equal(v, ft[k]) for k, v in load_folder(tmp_path / "out").items())


def test_cli_merge_plan_inspect_methods(family, tmp_path):
    base, models = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(ta_recipe(base, models)))
    runner = CliRunner()
    res = runner.invoke(main, ["merge", str(recipe), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["merge", str(recipe), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 5 and "already exists" in res.output
    res = runner.invoke(main, ["plan", str(recipe), "--memory-budget", "8KB", "--verbose"])
    assert res.exit_code == 0, res.output
    assert "model.layers.2.mlp.up_proj.weight [48, 32] bfloat16 <- task_arithmetic" in res.output
    assert "bytes to read" in res.output and "row blocks" in res.output
    res = runner.invoke(main, ["plan", str(recipe), "--json"])
    data = json.loads(res.output)
    assert data["summary"]["tensors"] == 30 and data["tensors"][0]["params"]["lambda"] == 0.8
    res = runner.invoke(main, ["inspect", str(base)])
    assert res.exit_code == 0 and "layers:      3" in res.output and "LlamaForCausalLM" in res.output
    res = runner.invoke(main, ["methods"])
    assert "task_arithmetic" in res.output and "lambda=1.0" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: linear\nmodels: [{model: x}]\nfoo: 1\n")
    res = runner.invoke(main, ["merge", str(bad), str(tmp_path / "o2"), "--strict"])
    assert res.exit_code == 2 and "`foo` is not a recipe field" in res.output
    assert "Traceback" not in res.output


def test_lazy_task_vector_api(family, tmp_path):
    base_dir, models = family
    base = weightsmith.Checkpoint.open(base_dir)
    a, b = (weightsmith.Checkpoint.open(m) for m in models[:2])
    tv_a, tv_b = a - base, b - base
    assert isinstance(tv_a, weightsmith.TaskVector) and tv_a.base is base
    merged = base + 0.4 * (tv_a + tv_b)
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = base.read(name).float() + 0.4 * (
        (a.read(name).float() - base.read(name).float()) + (b.read(name).float() - base.read(name).float())
    )
    assert torch.allclose(merged.tensor(name), expected, atol=1e-7)
    merged.save(tmp_path / "out", memory_budget="8KB")
    out = load_folder(tmp_path / "out")
    assert out[name].dtype == torch.bfloat16
    assert torch.equal(out[name], expected.bfloat16())
    assert "expression" in (tmp_path / "out" / "weightsmith_recipe.yaml").read_text()
    assert tv_a.norm() > 0
    with pytest.raises(TypeError):
        _ = base + "x"


def test_task_models_wrapping_the_base_are_mapped_by_prefix(family, tmp_path):
    base, models = family
    ft = load_folder(models[0])
    wrapped = {f"backbone.{k}": v for k, v in ft.items()}
    wrapped["score.weight"] = torch.zeros(2, 32, dtype=torch.bfloat16)  # a new task head
    wrapped_dir = save_model(tmp_path / "wrapped", wrapped, LLAMA_CONFIG, shards=1)
    recipe = ta_recipe(base, [wrapped_dir], weights=(1.0,), lam=1.0, extra_keys="ignore")
    plan = weightsmith.plan_merge(recipe)
    assert any("'backbone.'" in note for note in plan.notes)
    weightsmith.merge(recipe, tmp_path / "out")
    out = load_folder(tmp_path / "out")
    assert set(out) == set(ft) and all(torch.equal(out[k], ft[k]) for k in out)


def test_inputs_may_lack_integer_buffers_the_base_has(tmp_path):
    # transformers leaves non-persistent buffers (position_ids) out of newer saves
    base_state = random_state(LLAMA_CONFIG, seed=0)
    base_state["model.embeddings.position_ids"] = torch.arange(8)
    base = save_model(tmp_path / "base", base_state, LLAMA_CONFIG, shards=1)
    ft_state = {k: v for k, v in perturb(base_state, 1).items() if "position_ids" not in k}
    ft = save_model(tmp_path / "ft", ft_state, LLAMA_CONFIG, shards=1)
    weightsmith.merge(ta_recipe(base, [ft], weights=(1.0,), lam=1.0), tmp_path / "out")
    out = load_folder(tmp_path / "out")
    assert torch.equal(out["model.embeddings.position_ids"], torch.arange(8))


# --------------------------------------------------------------------------- item 10: signals, symlinks

SLOW_WRITER = (
    "import time, weightsmith.io.writer as w\n"
    "real = w.ShardWriter.write\n"
    "def slow(*a, **k):\n    time.sleep(0.2); return real(*a, **k)\n"
    "w.ShardWriter.write = slow\n"
    "from weightsmith.cli import main\nmain()\n"
)


def test_a_burst_of_ctrl_c_leaves_no_folder_and_no_traceback(family, tmp_path):
    base, models = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(ta_recipe(base, models)))
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, "merge", str(recipe), str(tmp_path / "out"), "-q"],
        stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and no_leftovers(tmp_path) and proc.poll() is None:
        time.sleep(0.02)
    sent = 0
    while proc.poll() is None and sent < 40:  # bounded: 40 signals, then wait for the exit
        proc.send_signal(signal.SIGINT)
        sent += 1
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert sent >= 2, err  # the burst really hit a running merge
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_overwrite_through_a_symlinked_out_replaces_its_target_and_keeps_the_link(family, tmp_path):
    base, models = family
    target = tmp_path / "disk" / "merged"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("old")
    link = tmp_path / "out"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="--overwrite"):
        weightsmith.merge(ta_recipe(base, models), link)
    weightsmith.merge(ta_recipe(base, models), link, overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "config.json").is_file() and not (target / "keep.txt").exists()
    assert no_leftovers(tmp_path) and no_leftovers(target.parent, "merged")


# --------------------------------------------------------------------------- item 12: full disk


def test_disk_full_names_out_and_the_bytes_needed_and_free(family, tmp_path, monkeypatch):
    base, models = family
    out = tmp_path / "out"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutputError, match="disk full") as e:
        weightsmith.merge(ta_recipe(base, models), out)
    msg = str(e.value)
    assert msg.startswith(f"{out}:") and "weightsmith-tmp" not in msg
    assert "needs" in msg and "is free there" in msg
    assert not out.exists() and no_leftovers(tmp_path)
    monkeypatch.undo()

    import weightsmith.io.writer as writer_mod

    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if offset > 0 and len(data) > 64:  # tensor data, not a header
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer_mod.os, "pwrite", pwrite)
    with pytest.raises(OutputError, match="disk full") as e:
        weightsmith.merge(ta_recipe(base, models), out)
    msg = str(e.value)
    assert msg.startswith(f"{out}:") and "weightsmith-tmp" not in msg and "needs" in msg
    assert not out.exists() and no_leftovers(tmp_path)
