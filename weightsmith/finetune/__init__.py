"""Minimal fine-tuning and evaluation engine for transformers checkpoints.

Nothing here imports ``transformers`` at module import time; it is loaded on first use and a
missing install is reported as ``pip install 'weightsmith[train]'``. The names below load on
first use too (PEP 562), so the CLI can register its commands without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightsmith.finetune.data import TASKS, Dataset, load_jsonl
    from weightsmith.finetune.evaluation import evaluate
    from weightsmith.finetune.evaluator import Evaluator
    from weightsmith.finetune.options import FinetuneOptions, OptionError
    from weightsmith.finetune.probes import feature_norms, parameter_gradients
    from weightsmith.finetune.trainer import FinetuneResult, TrainingError, finetune

_EXPORTS = {
    "TASKS": "data",
    "Dataset": "data",
    "load_jsonl": "data",
    "evaluate": "evaluation",
    "Evaluator": "evaluator",
    "FinetuneOptions": "options",
    "OptionError": "options",
    "feature_norms": "probes",
    "parameter_gradients": "probes",
    "FinetuneResult": "trainer",
    "TrainingError": "trainer",
    "finetune": "trainer",
}

__all__ = [  # a literal list, so linters see the re-exports
    "TASKS",
    "Dataset",
    "Evaluator",
    "FinetuneOptions",
    "FinetuneResult",
    "OptionError",
    "TrainingError",
    "evaluate",
    "feature_norms",
    "finetune",
    "load_jsonl",
    "parameter_gradients",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weightsmith.finetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
