"""Model references in a recipe: a local path or Hub id, mergekit's object form
``{model: {path, revision}, lora: {...}}``, BASE+ADAPTER (LoRA), and tokenizer sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weightsmith.errors import RecipeError
from weightsmith.notices import warn


def _model_ref(value: Any, where: str) -> str:
    if isinstance(value, dict):  # mergekit's object form {model: {path, revision}, lora: {...}}
        inner = value.get("model", value)
        if isinstance(inner, dict) and "path" in inner:
            ref = _path_at_revision(inner, where)
            lora = value.get("lora")
            if isinstance(lora, dict) and "path" in lora:
                ref += "+" + _path_at_revision(lora, f"{where}.lora")
            return ref
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: expected a local path or a Hub id like org/name")
    if "+" in value and not Path(value).exists():  # BASE+ADAPTER (LoRA): opened by Checkpoint.open
        parts = value.split("+")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise RecipeError(
                f"{where}: {value!r}: a LoRA reference is BASE+ADAPTER with exactly one '+' (each side "
                "a local folder or a Hub id, optionally @revision)"
            )
    return value


def _source_ref(value: Any, where: str) -> str:
    """A tokenizer source: union, base or a model; the pre-0.1 spelling `model:REF` is read as
    REF (mergekit 0.1.5 fails on it), with one warning line."""
    ref = _model_ref(value, where)
    if ref.startswith("model:") and not Path(ref).exists():
        ref = ref.removeprefix("model:").strip()
        warn(f"{where}: `model:{ref}` is the old spelling; read as {ref}")
    return ref


def _path_at_revision(spec: dict[str, Any], where: str) -> str:
    rev = spec.get("revision")
    if not isinstance(spec["path"], str) or not (rev is None or isinstance(rev, str)):
        raise RecipeError(f"{where}: `path` and `revision` must be strings")
    return f"{spec['path']}@{rev}" if rev else spec["path"]
