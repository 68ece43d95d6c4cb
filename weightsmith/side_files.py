"""The files written beside the merged shards: config.json, the tokenizer, files that describe
how to use the model, the recipe, the merge report and the model card."""

from __future__ import annotations

import json
from pathlib import Path

from weightsmith.dtype_names import dtype_name
from weightsmith.engine.executor import RunStats
from weightsmith.engine.plan import MergePlan
from weightsmith.io.model_card import base_license, render_card_from_report
from weightsmith.io.output_dir import OutputDir
from weightsmith.io.safetensors_format import DTYPE_NAMES
from weightsmith.model_ref import never_local, parse_model_ref
from weightsmith.tokenizer_output import tokenizer_root, write_tokenizer
from weightsmith.version import __version__

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Small files that describe how to use the model rather than its weights.
TAG_ALONG_FILES = (
    "generation_config.json",
    "preprocessor_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def write_side_files(
    plan: MergePlan, folder: OutputDir, stats: RunStats, seconds: float, hash_inputs: bool = False
) -> None:
    """config.json, tokenizer, recipe, model card and merge report beside the shards."""
    recipe = plan.recipe
    ref = plan.checkpoints[plan.ref_index]
    if ref.config is not None:
        config = {**ref.config, **plan.config_updates}
        float_dtypes = [t.out_dtype for t in plan.tasks if t.kind == "merge"]
        if float_dtypes:
            name = dtype_name(max(set(float_dtypes), key=float_dtypes.count))
            # transformers >= 4.56 reads `dtype`, earlier versions (which pyproject allows)
            # only `torch_dtype`: write both.
            config["torch_dtype"] = config["dtype"] = name
        rows = plan.out_vocab_rows
        if rows is not None and "vocab_size" in config:
            config["vocab_size"] = rows
        folder.write_json("config.json", config)
    write_tokenizer(recipe, plan.vocab, tokenizer_root(plan), folder, TOKENIZER_FILES)
    for fname in TAG_ALONG_FILES:
        if (ref.root / fname).is_file():
            folder.copy_file(ref.root / fname)
    folder.write_text("weightsmith_recipe.yaml", recipe.to_yaml())
    inputs = [c.provenance(full_hash=hash_inputs) for c in plan.checkpoints]
    name = recipe.name or Path(folder.out).name
    # The license follows the base model (or, without one, the model the output's config follows).
    lic_src = plan.checkpoints[plan.base_index] if plan.base_index is not None else ref
    license_ = base_license(
        lic_src.root,
        lic_src.config,
        # only a Hub input has a revision; for BASE+ADAPTER it is the base's
        repo_id=parse_model_ref(lic_src.ref, exists=never_local).path if lic_src.revision else None,
        revision=lic_src.revision,
    )
    report = {
        "weightsmith_version": __version__,
        "name": name,
        "merge_method": plan.method.name,
        "method_summary": plan.method.summary,
        "paper": plan.method.paper,
        "base_model": recipe.base_model,
        "license": license_ or None,
        "inputs": inputs,
        "input_hashes": "sha256" if hash_inputs else "sampled_fingerprint",
        "random_seed": plan.random_seed,
        "key_mappings": [{"model": ref, "strip": strip, "add": add}
                         for ref, (strip, add) in plan.key_mappings.items()],
        "dropped_tensors": plan.dropped,
        "seconds": round(seconds, 3),
        "stage_seconds": {k: round(v, 3) for k, v in stats.timings.items()},
        "bytes_read": stats.bytes_read,
        "bytes_written": stats.bytes_written,
        **({"resumed": {"reused_blocks": stats.reused_blocks, "reused_bytes": stats.reused_bytes}}
           if stats.reused_blocks else {}),
        "tensors": len(plan.tasks),
        "per_tensor": stats.report,
        **({"summary": stats.summary} if stats.summary else {}),
        "dtypes": sorted({DTYPE_NAMES[t.out_dtype] for t in plan.tasks}),
    }
    folder.write_text("merge_report.json", json.dumps(report, indent=2) + "\n")
    folder.write_text("README.md", render_card_from_report(report, recipe.to_yaml(), name=name))
