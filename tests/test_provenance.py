"""Provenance in the output folder (issue 15): the random seed, real sha256 of input shards on
request (and an honestly named sampled fingerprint by default), key mappings and dropped
tensors, per-tensor numbers for task_arithmetic, and both dtype keys in config.json."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from models import LLAMA_CONFIG, load_folder, perturb, random_state, save_model

import weightsmith
from weightsmith.cli import main

NAME = "model.layers.1.self_attn.q_proj.weight"


def recipe(base, models, method="task_arithmetic", **extra):
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, (1.0, 0.5))],
        "parameters": {"lambda": 0.6} if method == "task_arithmetic" else {"density": 0.5},
        "dtype": "float32",
        "out_dtype": "float32",
        **extra,
    }


def read(out: Path) -> tuple[dict, str, dict]:
    report = json.loads((out / "merge_report.json").read_text())
    return report, (out / "README.md").read_text(), json.loads((out / "config.json").read_text())


def test_task_arithmetic_reports_task_vector_norms_per_tensor(family, tmp_path):
    base, models = family
    weightsmith.merge(recipe(base, models[:2]), tmp_path / "out", memory_budget="8KB")  # row blocks
    report, card, config = read(tmp_path / "out")
    assert report["per_tensor"], "per_tensor must not be empty for task_arithmetic"
    b, a = (load_folder(p)[NAME].double() for p in (base, models[0]))
    expected = float((a - b).pow(2).sum())
    assert report["per_tensor"][NAME]["sq_tv[0]"] == pytest.approx(expected, rel=1e-5)
    out = load_folder(tmp_path / "out")[NAME].double()
    moved = float((out - b).pow(2).sum())
    assert report["per_tensor"][NAME]["sq_delta_out"] == pytest.approx(moved, rel=1e-4)
    rows = report["summary"]["models"]
    assert [r["model"] for r in rows] == [str(m) for m in models[:2]]
    total = sum(t["sq_tv[0]"] for t in report["per_tensor"].values())
    assert rows[0]["task_vector_norm"] == pytest.approx(math.sqrt(total))
    assert "task_vector_norm" in card and "merge_report.json" in card
    # transformers < 4.56 reads torch_dtype, later versions dtype: both are written
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert report["random_seed"] is None  # task arithmetic draws nothing at random


def test_random_seed_is_recorded_and_changes_the_output(family, tmp_path):
    base, models = family
    outs = {}
    for seed in (7, 8):
        out = tmp_path / f"dare{seed}"
        weightsmith.merge(recipe(base, models[:2], "dare_linear"), out, random_seed=seed)
        report, card, _ = read(out)
        assert report["random_seed"] == seed
        assert f"Random seed: {seed}" in card
        outs[seed] = load_folder(out)[NAME]
    assert not torch.equal(outs[7], outs[8])  # so the seed is provenance worth recording
    weightsmith.merge(recipe(base, models[:2], "dare_linear"), tmp_path / "default")
    assert read(tmp_path / "default")[0]["random_seed"] == 0  # what the merge drew from


def test_sampled_fingerprint_is_named_so_and_hash_inputs_gives_real_sha256(family, tmp_path):
    base, models = family
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(base, models[:2])))
    res = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "fast"), "--quiet"])
    assert res.exit_code == 0, res.output
    report, card, _ = read(tmp_path / "fast")
    shard = report["inputs"][0]["shards"][0]
    assert set(shard) == {"file", "bytes", "sampled_fingerprint"}
    assert report["input_hashes"] == "sampled_fingerprint"
    real = hashlib.sha256((Path(base) / shard["file"]).read_bytes()).hexdigest()
    assert shard["sampled_fingerprint"] != real
    assert "not the file's sha256" in card and f"sha256 {shard['sampled_fingerprint']}" not in card
    res = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "hashed"), "--quiet", "--hash-inputs"])
    assert res.exit_code == 0, res.output
    report, card, _ = read(tmp_path / "hashed")
    assert report["input_hashes"] == "sha256"
    for item in report["inputs"]:
        for s in item["shards"]:
            assert s["sha256"] == hashlib.sha256((Path(item["path"]) / s["file"]).read_bytes()).hexdigest()
            assert f"sha256 {s['sha256']}" in card
    assert "sampled fingerprint" not in card


def test_key_mappings_and_dropped_tensors_are_recorded(tmp_path):
    base_state = random_state(LLAMA_CONFIG, seed=0)
    base = save_model(tmp_path / "base", base_state, LLAMA_CONFIG, shards=1)
    state = {f"bert.{k}": v for k, v in perturb(base_state, 1).items()}
    state["classifier.weight"] = torch.ones(2, 32, dtype=torch.bfloat16)
    state["classifier.bias"] = torch.ones(2, dtype=torch.bfloat16)
    ft = save_model(tmp_path / "ft", state, LLAMA_CONFIG, shards=1)
    weightsmith.merge(recipe(base, [ft], extra_keys="ignore"), tmp_path / "out")
    report, card, _ = read(tmp_path / "out")
    assert report["key_mappings"] == [{"model": str(ft), "strip": "", "add": "bert."}]
    assert report["dropped_tensors"] == {str(ft): ["classifier.bias", "classifier.weight"]}
    assert "mapped '' -> 'bert.'" in card
    assert "`classifier.bias`, `classifier.weight`" in card and "extra_keys: ignore" in card
    # Without mapping or dropping, the report says so with empty values.
    base2 = save_model(tmp_path / "ft2", perturb(base_state, 2), LLAMA_CONFIG, shards=1)
    weightsmith.merge(recipe(base, [base2]), tmp_path / "plain")
    report, card, _ = read(tmp_path / "plain")
    assert report["key_mappings"] == [] and report["dropped_tensors"] == {}
    assert "mapped" not in card and "Left out" not in card
