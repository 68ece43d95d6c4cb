"""Minimal fine-tuning and evaluation engine for transformers checkpoints.

Nothing here imports ``transformers`` at module import time; it is loaded on first use and a
missing install is reported as ``pip install 'weightsmith[train]'``.
"""

from weightsmith.finetune.data import TASKS, Dataset, load_jsonl
from weightsmith.finetune.evaluation import evaluate
from weightsmith.finetune.evaluator import Evaluator
from weightsmith.finetune.options import FinetuneOptions, OptionError
from weightsmith.finetune.probes import feature_norms, parameter_gradients
from weightsmith.finetune.trainer import FinetuneResult, TrainingError, finetune

__all__ = [
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
