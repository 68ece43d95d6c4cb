"""`weightsmith plan` for slices: and modules: recipes: where each output layer comes from (every
module, full-range slices included) and the estimated peak memory of each output shard."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from models import LLAMA_CONFIG, save_model, save_pair
from test_slices import VLM_CONFIG, _vlm_state, vlm_recipe

from weightsmith.cli import main
from weightsmith.engine.layer_origin import LayerOrigin
from weightsmith.engine.tasks import SLOTS, bytes_per_element
from weightsmith.pipeline import plan_merge
from weightsmith.units import format_size

SIX = {**LLAMA_CONFIG, "num_hidden_layers": 6}


@pytest.fixture
def six(tmp_path):
    return save_pair(tmp_path, SIX)


def _stack(a, b):
    return {
        "merge_method": "linear",
        "dtype": "bfloat16",
        "parameters": {"weight": 0.5},
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 3]}, {"model": str(b), "layer_range": [1, 4]}]},
            {"sources": [{"model": str(a), "layer_range": [3, 6]}, {"model": str(b), "layer_range": [3, 6]}]},
        ],
    }


def _write(tmp_path, recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def plan(*args: str) -> str:
    res = CliRunner().invoke(main, ["plan", *args])
    assert res.exit_code == 0, res.output
    return res.output


def test_plan_shows_each_output_layer_and_each_shards_peak(six, tmp_path):
    a, b = six
    path = _write(tmp_path, _stack(a, b))
    text = plan(path, "--verbose", "--out-shard-size", "30KB")
    expected = [(0, 1), (1, 2), (2, 3), (3, 3), (4, 4), (5, 5)]
    for out, (la, lb) in enumerate(expected):
        assert f"  layer {out} <- {a}:{la} + {b}:{lb}\n" in text, text
    assert f"  0-2 <- {a}:0-2 + {b}:1-3" in text and f"  3-5 <- {a}:3-5 + {b}:3-5" in text

    report = json.loads(plan(path, "--json", "--out-shard-size", "30KB"))["summary"]
    assert [(r["layer"], [s["layer"] for s in r["sources"]]) for r in report["layer_map"]] == [
        (out, [la, lb]) for out, (la, lb) in enumerate(expected)
    ]
    assert {s["model"] for r in report["layer_map"] for s in r["sources"]} == {str(a), str(b)}
    shards = report["output_shards"]
    assert len(shards) > 2
    assert sum(s["bytes_to_write"] for s in shards) == report["bytes_to_write"]
    assert sorted({n for s in shards for n in s["layers"]}) == list(range(6))
    # A shard's peak: three slots of its largest unit plus one unit's scratch (no tensor here is
    # over budget), so the shards holding the embeddings or the head peak higher than the rest.
    full = plan_merge(_stack(a, b))
    slot, scratch = bytes_per_element(full)
    per_element = SLOTS * slot + scratch
    peaks = [s["estimated_peak_bytes"] for s in shards]
    assert max(peaks) == full.peak_estimate == per_element * 64 * 32  # embeddings / head: 64 x 32
    assert min(peaks) == per_element * 48 * 32  # a shard of layers only: the mlp's 48 x 32
    for s in shards:
        peak, writes = format_size(s["estimated_peak_bytes"]), format_size(s["bytes_to_write"])
        assert f"{s['shard']}: peak {peak}, writes {writes}, " in text
    assert text.count("model-0000") == len(shards)


def test_modules_recipe_maps_every_modules_layers(tmp_path):
    a = save_model(tmp_path / "vlm_a", _vlm_state(1), VLM_CONFIG, shards=1)
    b = save_model(tmp_path / "vlm_b", _vlm_state(2), VLM_CONFIG, shards=1)
    recipe = vlm_recipe(a, b)
    origins = plan_merge(recipe).layer_origins
    text_layers = [(str(a), 0), (str(a), 1), (str(a), 2), (str(a), 3), (str(b), 2), (str(b), 3)]
    assert origins == [
        *(LayerOrigin("text_decoder", n, (src,)) for n, src in enumerate(text_layers)),
        *(LayerOrigin("vision_tower", n, ((str(a), n), (str(b), n))) for n in range(3)),
    ]
    path = _write(tmp_path, recipe)
    text = plan(path, "--verbose")
    assert f"module vision_tower:   0-2 <- {a}:0-2 + {b}:0-2" in text
    assert f"module text_decoder:   4-5 <- {b}:2-3" in text
    assert f"  vision_tower layer 2 <- {a}:2 + {b}:2\n" in text
    assert f"  text_decoder layer 4 <- {b}:2\n" in text
    assert "output shards:   1;" in text
    report = json.loads(plan(path, "--json"))["summary"]
    assert [(r["module"], r["layer"]) for r in report["layer_map"]] == [
        *(("text_decoder", n) for n in range(6)),
        *(("vision_tower", n) for n in range(3)),
    ]


def test_a_full_range_slice_has_a_layer_map_and_a_models_recipe_none(six, tmp_path):
    a, b = six
    sliced = {
        "merge_method": "linear",
        "parameters": {"weight": 0.5},
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 6]}, {"model": str(b), "layer_range": [0, 6]}]}
        ],
    }
    full = plan_merge(sliced)
    assert full.layer_origins == [LayerOrigin(None, n, ((str(a), n), (str(b), n))) for n in range(6)]
    assert full.notes[:2] == ["layer map (output <- model:input layers):", f"  0-5 <- {a}:0-5 + {b}:0-5"]
    models = {k: v for k, v in sliced.items() if k != "slices"}
    models["models"] = [{"model": str(a)}, {"model": str(b)}]
    assert plan_merge(models).layer_origins == []
    path = _write(tmp_path, models)
    assert "output shards:" not in plan(path)
    assert "layer_map" not in json.loads(plan(path, "--json"))["summary"]


def test_executor_ray_plan_gives_each_tasks_peak_instead(six, tmp_path):
    a, b = six
    path = _write(tmp_path, _stack(a, b))
    text = plan(path, "--executor", "ray", "--out-shard-size", "30KB", "--verbose")
    assert f"  layer 3 <- {a}:3 + {b}:3\n" in text
    tasks = [line for line in text.splitlines() if line.startswith("  task ")]
    assert len(tasks) > 2 and all(", peak " in line for line in tasks)
    assert "output shards:" not in text
    report = json.loads(plan(path, "--json", "--executor", "ray", "--out-shard-size", "30KB"))["summary"]
    ray = [w["estimated_peak_bytes"] for w in report["ray_partition"]]
    assert ray == [s["estimated_peak_bytes"] for s in report["output_shards"]]
