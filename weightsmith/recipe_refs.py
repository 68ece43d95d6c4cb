"""Model references in a recipe: a local path or Hub id, mergekit's object form
``{model: {path, revision}, lora: {...}}``, BASE+ADAPTER (LoRA), and tokenizer sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weightsmith.errors import RecipeError
from weightsmith.model_ref import ModelRef, parse_model_ref
from weightsmith.notices import warn


def _model_ref(value: Any, where: str) -> str:
    """The reference as text (model_ref.py parses it): a string as written, checked; the
    object form written as ``path@revision+lora_path@revision``."""
    if isinstance(value, dict):  # mergekit's object form {model: {path, revision}, lora: {...}}
        inner = value.get("model", value)
        if isinstance(inner, dict) and "path" in inner:
            ref = _path_at_revision(inner, where)
            lora = value.get("lora")
            if isinstance(lora, dict) and "path" in lora:
                ref = ModelRef(ref.path, ref.revision, _path_at_revision(lora, f"{where}.lora"))
            return str(ref)
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: expected a local path or a Hub id like org/name")
    parse_model_ref(value, where=where)  # BASE+ADAPTER (LoRA) has two sides; Checkpoint.open opens it
    return value


def _source_ref(value: Any, where: str) -> str:
    """A tokenizer source: union, base or a model; the pre-0.1 spelling `model:REF` is read as
    REF (mergekit 0.1.5 fails on it), with one warning line."""
    ref = _model_ref(value, where)
    if ref.startswith("model:") and not Path(ref).exists():
        ref = ref.removeprefix("model:").strip()
        warn(f"{where}: `model:{ref}` is the old spelling; read as {ref}")
    return ref


def _path_at_revision(spec: dict[str, Any], where: str) -> ModelRef:
    rev = spec.get("revision")
    if not isinstance(spec["path"], str) or not (rev is None or isinstance(rev, str)):
        raise RecipeError(f"{where}: `path` and `revision` must be strings")
    return ModelRef(spec["path"], rev or None)
