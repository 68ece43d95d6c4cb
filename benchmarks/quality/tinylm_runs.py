"""TinyLM helpers shared by the LiNeS, transfer and grafting reproductions: seeded fine-tunes
(cached across scripts), merges read back as state dicts, and exact-match scorers."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from reporting import log, parser, testbed

from weightsmith.finetune import Evaluator, finetune
from weightsmith.finetune.modeling import iter_safetensors
from weightsmith.pipeline import merge
from weightsmith.testbeds.tinylm import FINETUNE, MAX_LENGTH

SKILLS = ("revsep", "mod7", "shift", "count")  # held-out skills, one task vector each
PRETRAIN_TASKS = ("copy", "reverse", "sort", "add", "lookup")  # the base's own skills: controls


def finetuned(bed: Path, work: Path, task: str, seed: int, base: str = "base", **overrides: Any) -> Path:
    """``base`` fine-tuned on ``task`` with the testbed's settings and ``seed`` (cached on disk:
    the same seed gives the same bytes, so a cached folder with the same options is reused)."""
    options = {**FINETUNE, **overrides, "seed": seed, "max_length": MAX_LENGTH}
    tag = "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    out = work / "tinylm-ft" / f"{base}-{task}-s{seed}{'-' + tag if tag else ''}"
    log_file = out / "train_log.json"
    if log_file.is_file():
        recorded = json.loads(log_file.read_text())["options"]
        if all(recorded.get(k) == v for k, v in options.items()):
            return out
    log(f"fine-tune {base} on {task} (seed {seed}{', ' + tag if tag else ''})")
    finetune(bed / base, out, bed / "data" / task / "train.jsonl", "causal-lm", quiet=True,
             overwrite=True, **options)
    return out


def state(folder: Path) -> dict[str, torch.Tensor]:
    return dict(iter_safetensors(folder))


def merged(recipe: dict[str, Any], scratch: Path) -> dict[str, torch.Tensor]:
    """Run a recipe through ``weightsmith merge`` and read the result back."""
    if scratch.exists():
        shutil.rmtree(scratch)
    merge(recipe, scratch)
    return state(scratch)


class Scorers:
    """Exact-match scorers on the testbed's splits, built once (each holds a model copy)."""

    def __init__(self, bed: Path) -> None:
        self.bed = bed
        self._cache: dict[str, Evaluator] = {}

    def get(self, split: str) -> Evaluator:
        """``split``: ``<task>/<split>`` for skills, ``pretrain/val-<task>`` for the base's."""
        if split not in self._cache:
            self._cache[split] = Evaluator(self.bed / "base", self.bed / "data" / f"{split}.jsonl",
                                           "causal-lm", batch_size=64, max_length=MAX_LENGTH)
        return self._cache[split]

    def score(self, weights: dict[str, torch.Tensor] | None, split: str) -> float:
        return self.get(split).score(weights)


def start(doc: str | None) -> tuple[argparse.Namespace, Path, Scorers, float]:
    """What every TinyLM reproduction does first: parse its options, set torch's threads,
    find (or build) the testbed and its scorers. Returns them with the start time."""
    args = parser((doc or "").splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bed = testbed("tinylm", args.testbeds)
    return args, bed, Scorers(bed), started
