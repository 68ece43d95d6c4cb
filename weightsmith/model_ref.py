"""Model references, parsed in one place for the recipe, the readers, the stages and the model card.

A reference names a model as a local path (a folder or a ``.safetensors`` file), a Hub repo id
``org/name``, a Hub id at a revision ``org/name@rev`` (a branch, tag or commit; ``rev`` may hold
``/`` as in ``refs/pr/1``), or ``BASE+ADAPTER``: a PEFT LoRA adapter applied to BASE, each side
one of the former. A local path is what it says even when it contains ``+`` or ``@``: a text
that names an existing path is never split, and only a Hub id carries a revision (``./x@v2``
and ``/models/x@v2`` are paths).

The rest of the package keeps references as the text the user wrote (recipes record it as
written); ``ModelRef`` is that text parsed, and ``str(ref)`` writes it back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from weightsmith.errors import RecipeError, WeightsmithError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
LORA_FORM = (
    "a LoRA reference is BASE+ADAPTER with exactly one '+' (each side a local folder or a Hub id, "
    "optionally @revision)"
)


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` or ``org/name@rev``: the shape of a Hub id (a relative local path can have
    it too; the reader decides by what exists, io/checkpoint.py)."""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/"))


def local_path_exists(text: str) -> bool:
    """Whether ``text`` names an existing path, from the working directory."""
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def never_local(text: str) -> bool:
    """For texts known not to be an existing path (the reader tried them already)."""
    return False


@dataclass(frozen=True)
class ModelRef:
    """One parsed model reference (see the module's doc)."""

    path: str  # a local path, or a Hub repo id without its revision
    revision: str | None = None  # a Hub revision; a local path never has one
    adapter: ModelRef | None = None  # BASE+ADAPTER: the LoRA adapter applied to this model

    @property
    def base(self) -> ModelRef:
        """The model without its adapter."""
        return ModelRef(self.path, self.revision)

    @property
    def is_hub_id(self) -> bool:
        return looks_like_hub_id(self.path)

    def __str__(self) -> str:
        text = f"{self.path}@{self.revision}" if self.revision else self.path
        return f"{text}+{self.adapter}" if self.adapter is not None else text


def at_revision(text: str) -> ModelRef:
    """One side of a reference: ``org/name@rev`` -> path ``org/name``, revision ``rev``; any
    other text (a local path, even with ``@``) is a path without revision."""
    if "@" in text and looks_like_hub_id(text):
        path, _, revision = text.partition("@")
        return ModelRef(path, revision)
    return ModelRef(text)


def parse_model_ref(
    text: str,
    *,
    exists: Callable[[str], bool] = local_path_exists,
    where: str = "model",
    error: type[WeightsmithError] = RecipeError,
) -> ModelRef:
    """Parse ``text`` (see the module's doc). ``exists`` says whether a text names an existing
    local path (the reader passes its own search, with the recipe's folder); such a text is one
    path, never split at ``+`` or ``@``. A ``+`` elsewhere must join exactly two non-empty sides,
    else ``error`` names ``where`` and the text."""
    if exists(text):
        return ModelRef(text)
    if "+" not in text:
        return at_revision(text)
    parts = [p.strip() for p in text.split("+")]
    if len(parts) != 2 or not all(parts):
        raise error(f"{where}: {text!r}: {LORA_FORM}")
    base, adapter = (ModelRef(p) if exists(p) else at_revision(p) for p in parts)
    return ModelRef(base.path, base.revision, adapter)
