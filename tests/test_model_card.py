"""The model card: front matter a YAML parser (and the Hub's own card parser) reads, inputs,
merge report summary, evaluation table, license carried from the base, and refreshing."""

from __future__ import annotations

import json

import pytest
import yaml
from models import LLAMA_CONFIG, make_family, perturb, random_state, save_model

import weightsmith
from weightsmith.errors import DataError
from weightsmith.io.model_card import (
    CARD_MARKER,
    base_license,
    eval_table,
    hub_input_ids,
    load_eval_results,
    read_front_matter,
    refresh_model_card,
    render_model_card,
)

SHA = "89abcdef0123456789abcdef0123456789abcdef"


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    block = card.split("\n---\n", 1)[0].removeprefix("---\n")
    meta = yaml.safe_load(block)
    assert isinstance(meta, dict)
    return meta


def card_kwargs(**over):
    kwargs = dict(
        name="m",
        method="ties",
        method_summary="trim, elect sign, merge",
        paper="Yadav et al. 2023",
        recipe_yaml="merge_method: ties\n",
        inputs=[],
        base=None,
        version="0.1.0",
    )
    kwargs.update(over)
    return kwargs


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def cached_model(cache, repo_id, state, readme=None, config=LLAMA_CONFIG):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = save_model(repo / "snapshots" / SHA, state, config, shards=2)
    if readme is not None:
        (snap / "README.md").write_text(readme)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    return snap


def test_merged_card_front_matter_parses_and_lists_only_hub_ids(hub_cache, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    base = random_state(LLAMA_CONFIG, 3)
    cached_model(hub_cache, "acme/base", base, readme="---\nlicense: apache-2.0\ntags: [x]\n---\n# Base\n")
    # a local folder whose relative path looks like a Hub id must not be listed as a base model
    monkeypatch.chdir(tmp_path)
    save_model(tmp_path / "local" / "ft", perturb(base, 5), LLAMA_CONFIG)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "acme/base",
        "models": [{"model": "local/ft", "parameters": {"weight": 0.7}}],
    }
    weightsmith.merge(recipe, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == ["acme/base"]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["merge", "weightsmith", "task_arithmetic"]
    assert meta["license"] == "apache-2.0"
    # the Hub client's own card parser reads the same metadata (locally: no validation call)
    parsed = ModelCard(card)
    assert parsed.data.base_model == ["acme/base"] and parsed.data.license == "apache-2.0"
    # inputs with revisions and full shard hashes; the recipe; the report summary
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    for item in report["inputs"]:
        for shard in item["shards"]:
            assert shard.get("sha256", shard.get("sampled_fingerprint")) in card
    assert f"| `acme/base` | {SHA} |" in card and "| `local/ft` | - |" in card
    assert "## Merge report" in card and f"| tensors | {report['tensors']} |" in card
    assert "weight: 0.7" in card.split("## Recipe", 1)[1]
    assert report["license"] == {"license": "apache-2.0"} and report["name"] == "out"


def test_hub_input_ids_need_a_resolved_revision():
    inputs = [
        {"model": "org/a@v1", "revision": SHA},
        {"model": "org/a", "revision": SHA},  # listed once
        {"model": "models/local", "revision": None},
        {"model": "/abs/path", "revision": None},
    ]
    assert hub_input_ids(inputs) == ["org/a"]


def test_license_sources(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    assert base_license(folder, None) == {}
    assert base_license(folder, {"license": "mit"}) == {"license": "mit"}
    (folder / "README.md").write_text(
        "---\nlicense: other\nlicense_name: acme-license\nlicense_link: LICENSE\n---\ntext\n"
    )
    assert base_license(folder, {"license": "mit"}) == {
        "license": "other",
        "license_name": "acme-license",
        "license_link": "LICENSE",
    }
    (folder / "README.md").write_text("---\n: not yaml: [\n---\n")
    assert base_license(folder, {"license": "mit"}) == {"license": "mit"}  # unparsable: fallback


def test_license_options_reach_front_matter():
    card = render_model_card(**card_kwargs(license="other", license_name="acme", license_link="LICENSE"))
    meta = front_matter(card)
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "acme", "LICENSE")
    assert "base_model" not in meta  # no Hub inputs, no base_model key (an empty list is invalid)


def test_report_summary_renders_as_a_table():
    report = {
        "tensors": 30,
        "dtypes": ["bfloat16"],
        "bytes_read": 3_000_000,
        "bytes_written": 1_000_000,
        "seconds": 1.5,
        "summary": {
            "totals": {"kept": 25.0, "total": 100.0},
            "global_passes": 1,
            "kept_fraction": 0.25,
            "lines": ["kept 25.0% of task-vector entries", "sign agreement 61%"],
        },
    }
    card = render_model_card(**card_kwargs(report=report))
    section = card.split("## Merge report", 1)[1].split("##", 1)[0]
    for row in (
        "| tensors | 30 |",
        "| output dtypes | bfloat16 |",
        "| bytes read | 3.00 MB (3,000,000 B) |",
        "| wall time | 1.50 s |",
        "| totals.kept | 25 |",
        "| totals.total | 100 |",
        "| global_passes | 1 |",
        "| kept_fraction | 0.25 |",
        "- kept 25.0% of task-vector entries",
        "- sign agreement 61%",
    ):
        assert row in section, row
    assert front_matter(card)["tags"] == ["merge", "weightsmith", "ties"]


def test_eval_results_as_printed_by_weightsmith_eval(tmp_path):
    path = tmp_path / "eval_results.json"
    path.write_text(json.dumps({"accuracy": 0.8125, "loss": 0.5, "examples": 64}))
    rows = load_eval_results(path)
    assert eval_table(rows) == [
        "| accuracy | loss | examples |",
        "|---|---|---|",
        "| 0.8125 | 0.5000 | 64 |",
    ]


def test_eval_results_several_rows_with_labels_and_nested_metrics():
    rows = load_eval_results(
        [
            {"task": "sst2", "dataset": "sst2/test.jsonl", "accuracy": 0.9, "loss": 0.25},
            {"task": "mnli", "metrics": {"accuracy": 0.8, "f1": 0.75}},
        ]
    )
    assert eval_table(rows) == [
        "| task | dataset | accuracy | loss | f1 |",
        "|---|---|---|---|---|",
        "| sst2 | sst2/test.jsonl | 0.9000 | 0.2500 | - |",
        "| mnli | - | 0.8000 | - | 0.7500 |",
    ]
    card = render_model_card(**card_kwargs(eval_results=rows))
    assert "## Evaluation" in card and card.index("## Evaluation") < card.index("## Recipe")


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "evaluation 0 is a int"),
        ('{"accuracy": [0.5]}', "expected a number or a label"),
        ('{"metrics": {"accuracy": "high"}}', "expected a number, got str"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_eval_results_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "eval_results.json"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_eval_results(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_refresh_adds_eval_results_and_respects_hand_edits(tmp_path):
    base, models = make_family(tmp_path / "in", n_models=2)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
    }
    out = tmp_path / "out"
    weightsmith.merge(recipe, out)
    original = (out / "README.md").read_text()
    assert CARD_MARKER in original and "## Evaluation" not in original
    assert refresh_model_card(out) is False  # nothing new: unchanged
    (out / "eval_results.json").write_text(json.dumps({"task": "toy", "accuracy": 0.5}))
    assert refresh_model_card(out) is True
    refreshed = (out / "README.md").read_text()
    assert "| task | accuracy |" in refreshed and "| toy | 0.5000 |" in refreshed
    evaluation = refreshed[refreshed.index("## Evaluation") : refreshed.index("## Recipe")]
    assert refreshed.replace(evaluation, "") == original  # only the evaluation section was added
    hand_edited = "---\nlicense: mit\n---\n# My own card\n"
    (out / "README.md").write_text(hand_edited)
    (out / "eval_results.json").write_text(json.dumps({"accuracy": 0.9}))
    assert refresh_model_card(out) is False and (out / "README.md").read_text() == hand_edited


def test_read_front_matter():
    assert read_front_matter("---\nlicense: mit\n---\nbody") == {"license": "mit"}
    assert read_front_matter("# no metadata") is None
    assert read_front_matter("---\nlicense: mit\nno closing line") is None
