"""The merged tokenizer of a recipe: planning the vocabulary alignment (before the plan is
built, from tokenizer files only) and writing the output's tokenizer files and chat template."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from weightsmith.io.chat_templates import resolve_chat_template, write_chat_template
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.io.output_dir import OutputDir
from weightsmith.io.tokenizer_build import VocabAlignment, build_alignment
from weightsmith.recipe import Recipe

if TYPE_CHECKING:
    from weightsmith.engine.tasks import MergePlan

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _has_tokenizer(ckpt: Checkpoint) -> bool:
    return any((ckpt.root / name).is_file() for name in TOKENIZER_MARKERS)


def plan_vocabulary(recipe: Recipe, checkpoints: list[Checkpoint]) -> VocabAlignment | None:
    """The alignment of every input's vocabulary rows to the recipe's output tokenizer; None
    when the recipe builds none, or when ``base``/a model source leaves every input as it is
    (then the source's files are copied, as without a tokenizer block)."""
    resolve_chat_template(recipe.chat_template)  # a bad name fails at plan time
    spec = recipe.tokenizer
    if spec is None:
        return None
    n_inputs = (recipe.base_model is not None) + len(recipe.models)
    involved = list(range(n_inputs))
    base = 0 if recipe.base_model is not None else None
    source = spec["source"]
    simple = source != "union" and not spec["tokens"] and not spec["pad_to_multiple_of"]
    source_ckpt = None
    if source not in ("union", "base"):
        source_ckpt = next((checkpoints[i] for i in involved if checkpoints[i].ref == source), None)
        source_ckpt = source_ckpt or Checkpoint.open(source, search_dirs=recipe.search_dirs)
    if simple and not all(_has_tokenizer(checkpoints[i]) for i in involved):
        return None  # no tokenizers to align by: files copied, vocab_policy decides the rows
    alignment = build_alignment(checkpoints, involved, base, spec, source_ckpt)
    if simple and all(alignment.is_identity(i, alignment.input_rows[i]) for i in involved):
        return None
    return alignment


def write_tokenizer(
    recipe: Recipe,
    alignment: VocabAlignment | None,
    tok_root: Path,
    folder: OutputDir,
    files: tuple[str, ...],
) -> None:
    """Tokenizer files into the output: the merged tokenizer when one was built, else the
    source's files copied; then the recipe's chat template, if it names one."""
    if alignment is not None:
        with tempfile.TemporaryDirectory() as tmp:
            alignment.tokenizer.save_pretrained(tmp)
            for path in sorted(Path(tmp).iterdir()):
                if path.is_file():
                    folder.copy_file(path)
    else:
        for fname in files:
            if (tok_root / fname).is_file():
                folder.copy_file(tok_root / fname)
    template = resolve_chat_template(recipe.chat_template)
    if template is not None:
        write_chat_template(folder.path(""), template)


def tokenizer_root(plan: MergePlan) -> Path:
    """The folder the output's tokenizer files come from (``tokenizer_source``, else the
    model the output's config follows)."""
    source = plan.recipe.tokenizer_source
    ref = plan.checkpoints[plan.ref_index]
    if source in (None, "base", "union"):
        return ref.root
    for ckpt in plan.checkpoints:
        if ckpt.ref == source:
            return ckpt.root
    return Checkpoint.open(source, search_dirs=plan.recipe.search_dirs).root
