"""Published mergekit recipes, unchanged, plan and merge on tiny local checkpoints.

The corpus (``tests/recipes_in_the_wild/``) holds recipes people published in model cards,
GitHub issues, blog posts and notebooks, each saved as published with its source and the
recipe features it uses. ``manifest.yaml`` maps every model a recipe names to a tiny local
checkpoint of the right architecture and depth (``tests/wild_checkpoints.py``). Each recipe is
run through ``weightsmith plan`` and ``weightsmith merge`` (the CLI, in process) with only the
model references rewritten.

Recipes that use a feature weightsmith lacks are strict xfails, driven by NOT_YET_SUPPORTED
below: whoever lands a feature deletes its row, and the strict xfail then makes every recipe
that uses it (and nothing else missing) a test that must pass.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from wild_checkpoints import ARCHITECTURE_CLASS, VOCAB, CheckpointZoo, make_config, tensor_shapes

from weightsmith.cli import main

CORPUS = Path(__file__).parent / "recipes_in_the_wild"
MANIFEST = yaml.safe_load((CORPUS / "manifest.yaml").read_text())["recipes"]

# Recipe features weightsmith does not support yet -> what is missing (and the issue that
# tracks it). Delete a row when its feature lands.
NOT_YET_SUPPORTED: dict[str, str] = {
}
# Features weightsmith handles today; every feature in the manifest is in one of the two tables.
SUPPORTED = {
    "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "model_stock", "della", "della_linear", "sce", "nuslerp", "multislerp",
    "karcher", "arcee_fusion", "nearswap", "gradient", "filters", "int8_mask", "out_dtype",
    "base-listed-in-models", "no-base", "name-field", "chat_template-auto", "tokenizer_source-base",
    "tokenizer_source-model", "local-path", "quoted-local-paths", "windows-paths", "stage-reference",
    "yaml-comments", "scientific-notation", "lora-ref", "multi-document", "parameters-not-taken",
    "unknown-top-level-key", "typo-key", "normalize-as-number", "slices-full", "slices-stacking",
    "slices-partial", "slice-parameters", "source-parameters", "base-as-slice-source", "modules",
    "passthrough", "tokenizer_source-union", "tokenizer_source-model-prefix", "tokenizer-block-base",
    "tokenizer-block-union", "tokenizer-block-model", "tokenizer-block-empty", "chat_template-named",
    "lambda", "rescale", "epsilon", "top-level-weight", "single-model", "non-ascii-comments",
    "filters-non-layer-tensors", "duplicate-model", "trailing-whitespace", "model-names-with-spaces",
    "overlapping-slices", "same-model-repeated-in-slice", "density-gradient", "nuslerp-with-base",
}
MODEL_KEYS = {"model", "base_model"}
TOKENIZER_KEYS = {"tokenizer_source", "source"}
NOT_MODELS = {"base", "union"}


def missing_features(entry: dict[str, Any]) -> list[str]:
    return [f for f in entry["features"] if f in NOT_YET_SUPPORTED]


def _param(entry: dict[str, Any]) -> Any:
    missing = missing_features(entry)
    marks = []
    if missing:
        reason = "needs " + "; ".join(NOT_YET_SUPPORTED[f] for f in missing)
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(entry, id=entry["file"].removesuffix(".yaml"), marks=marks)


def load_docs(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((CORPUS / entry["file"]).read_text()) if d is not None]


def stage_names(docs: list[dict[str, Any]]) -> set[str]:
    """Names of the stages of a multi-document recipe (references to them stay as written)."""
    if len(docs) < 2:
        return set()
    return {d["name"] for d in docs if isinstance(d.get("name"), str)}


def model_refs(node: Any) -> list[str]:
    """Every string the recipe uses as a model: model / base_model values, tokenizer sources."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and (
                key in MODEL_KEYS or (key in TOKENIZER_KEYS and value not in NOT_MODELS)
            ):
                found.append(value)
            else:
                found += model_refs(value)
    elif isinstance(node, list):
        for value in node:
            found += model_refs(value)
    return found


def rewrite(node: Any, paths: dict[str, str]) -> Any:
    """The parsed recipe with each model reference replaced by its local checkpoint path."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if isinstance(value, str) and (key in MODEL_KEYS | TOKENIZER_KEYS) and value in paths:
                out[key] = paths[value]
            else:
                out[key] = rewrite(value, paths)
        return out
    if isinstance(node, list):
        return [rewrite(v, paths) for v in node]
    return node


def slice_depth(node: Any) -> int:
    """The largest layer_range end anywhere in the recipe (0 without slices)."""
    if isinstance(node, dict):
        own = int(node["layer_range"][1]) if "layer_range" in node else 0
        return max([own, *(slice_depth(v) for v in node.values())])
    if isinstance(node, list):
        return max([0, *(slice_depth(v) for v in node)])
    return 0


def rewrite_text(text: str, paths: dict[str, str]) -> str:
    """The recipe text, comments and layout kept, with each model reference replaced (longest
    first, whole references only; ``test_corpus_is_complete_and_consistent`` checks that this
    parses to exactly what ``rewrite`` gives)."""
    for ref in sorted(paths, key=len, reverse=True):
        pattern = r"(?<![\w./\\+-])" + re.escape(ref) + r"(?![\w./\\+-])"
        text = re.sub(pattern, lambda _, new=paths[ref]: new, text)
    return text


def output_depth(docs: list[dict[str, Any]], entry: dict[str, Any]) -> int:
    """Layers the merged model must have: the sum of the final stage's slice lengths, or the
    depth of the inputs when it has no slices."""
    final = next((d for d in reversed(docs) if "name" not in d), docs[-1])
    slices = final.get("slices")
    for module in (final.get("modules") or {}).values():
        slices = slices or module.get("slices")
    if not slices:
        return entry["layers"]
    return sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in slices)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> CheckpointZoo:
    return CheckpointZoo(tmp_path_factory.mktemp("wild_checkpoints"))


def check_merged(out: Path, architecture: str, layers: int) -> None:
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE_CLASS[architecture]]
    assert config["num_hidden_layers"] == layers
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    tied = bool(make_config(architecture, 1).get("tie_word_embeddings"))
    expected = tensor_shapes(architecture, layers, tied)
    assert set(state) == set(expected), sorted(set(state) ^ set(expected))[:10]
    for name, tensor in state.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # a merged vocabulary may grow
            assert tensor.shape[0] >= VOCAB and tuple(tensor.shape[1:]) == expected[name][1:], name
        else:
            assert tuple(tensor.shape) == expected[name], name
        assert torch.isfinite(tensor.float()).all(), name


@pytest.mark.parametrize("entry", [_param(e) for e in MANIFEST])
def test_recipe_plans_and_merges(entry: dict[str, Any], zoo: CheckpointZoo, tmp_path: Path) -> None:
    docs = load_docs(entry)
    arch, layers = entry["architecture"], entry["layers"]
    paths = {ref: zoo.resolve(arch, layers, local) for ref, local in entry["models"].items()}
    recipe = tmp_path / entry["file"]
    recipe.write_text(rewrite_text((CORPUS / entry["file"]).read_text(), paths))
    runner = CliRunner()

    planned = runner.invoke(main, ["plan", str(recipe)])
    assert planned.exit_code == 0, f"weightsmith plan failed:\n{planned.output}{planned.exception!r}"

    out = tmp_path / "merged"
    merged = runner.invoke(main, ["merge", str(recipe), str(out), "--quiet", "--no-fsync", "--threads", "1"])
    assert merged.exit_code == 0, f"weightsmith merge failed:\n{merged.output}{merged.exception!r}"
    check_merged(out, arch, output_depth(docs, entry))


def test_corpus_is_complete_and_consistent() -> None:
    """The manifest covers every recipe file, maps every model reference, keeps every
    layer_range valid, and names only known features; prints what runs today."""
    files = sorted(p.name for p in CORPUS.glob("[0-9][0-9][0-9]-*.yaml"))
    assert sorted(e["file"] for e in MANIFEST) == files
    assert len(files) >= 40
    for entry in MANIFEST:
        text = (CORPUS / entry["file"]).read_text()
        head = text.splitlines()[:2]
        assert head[0].startswith("# source: ") and head[0] != "# source: ", entry["file"]
        assert head[1] == "# features: " + ", ".join(entry["features"]), entry["file"]
        docs = load_docs(entry)
        unmapped = set(model_refs(docs)) - set(entry["models"]) - stage_names(docs)
        assert not unmapped, f"{entry['file']}: no local checkpoint for {sorted(unmapped)}"
        assert entry["architecture"] in ARCHITECTURE_CLASS, entry["file"]
        assert entry["slice_depth"] == slice_depth(docs), entry["file"]
        assert entry["layers"] >= entry["slice_depth"], entry["file"]
        fake = {ref: f"/zoo/{entry['architecture']}/{local}" for ref, local in entry["models"].items()}
        substituted = [d for d in yaml.safe_load_all(rewrite_text(text, fake)) if d is not None]
        assert substituted == [rewrite(d, fake) for d in docs], f"{entry['file']}: text rewrite differs"
        unknown = set(entry["features"]) - SUPPORTED - set(NOT_YET_SUPPORTED)
        assert not unknown, f"{entry['file']}: unknown features {sorted(unknown)}"
    runnable = [e for e in MANIFEST if not missing_features(e)]
    blockers = Counter(f for e in MANIFEST for f in missing_features(e))
    print(f"\nrecipes in the wild: {len(runnable)}/{len(MANIFEST)} run today; blocked by: "
          + ", ".join(f"{f} {n}" for f, n in blockers.most_common()))
    assert runnable, "no recipe in the corpus runs today"
