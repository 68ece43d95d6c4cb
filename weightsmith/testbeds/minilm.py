"""MiniLM testbed: the packaged all-MiniLM-L6-v2 plus one fine-tune per text task.

Per task, following the frozen-head protocol of algorithms.md §11: a linear probe fits a head on
the frozen pre-trained encoder (``probe-<task>``, the task's "zero-shot" model), then the encoder
is fine-tuned with that head frozen (``ft-<task>``). Task vectors thus live in the shared
backbone, and any merged backbone can be scored with each task's probe head.

Layout::

    OUT/base/                 the pre-trained BertModel (copied from the wheel)
    OUT/probe-<task>/         base encoder + linear-probe head
    OUT/ft-<task>/            fine-tuned encoder + the same head
    OUT/data/<task>/{train,val,test,test_ood}.jsonl
    OUT/testbed.json          recipe, hash, versions, timings, accuracies
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from weightsmith.finetune.evaluation import evaluate
from weightsmith.finetune.modeling import TOKENIZER_FILES
from weightsmith.finetune.runtime import fixed_threads
from weightsmith.finetune.trainer import finetune
from weightsmith.testbeds.common import (
    Stages,
    cached_info,
    recipe_hash,
    start_build,
    versions,
    write_info,
    write_jsonl,
)
from weightsmith.testbeds.paths import minilm_dir
from weightsmith.testbeds.text_tasks import TASKS, generate

RECIPE_VERSION = 1  # bump whenever generators or training code change the produced bytes

SPLITS = {"train": 600, "val": 200, "test": 200, "test_ood": 200}
PROBE = {"steps": 60, "lr": 5e-3, "batch_size": 32, "train_only": ["classifier"]}
FINETUNE = {
    "steps": 120,
    "lr": 5e-5,
    "batch_size": 16,
    "warmup_steps": 10,
    # The head stays the probe's; word embeddings are frozen because most rows never get a
    # gradient from 600 template sentences and updating 11.7M of them dominates CPU time.
    "freeze": ["classifier", "word_embeddings"],
}
MAX_LENGTH = 48
SEED = 0
THREADS = 1


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def recipe() -> dict[str, object]:
    base = minilm_dir()
    v = versions()
    return {
        "testbed": "minilm",
        "recipe_version": RECIPE_VERSION,
        "base_weights_sha256": _file_digest(base / "model.safetensors"),
        "tasks": {name: list(task.labels) for name, task in TASKS.items()},
        "splits": SPLITS,
        "probe": PROBE,
        "finetune": FINETUNE,
        "max_length": MAX_LENGTH,
        "seed": SEED,
        "threads": THREADS,
        # Different torch/transformers versions can change the bytes, so they are part of it.
        "versions": {k: v[k] for k in ("torch", "transformers") if k in v},
    }


def _copy_base(out: Path) -> Path:
    src, dst = minilm_dir(), out / "base"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", *TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


def _split_seed(task_index: int, split_index: int) -> int:
    return SEED * 10_000 + task_index * 100 + split_index


def build(out_dir: str | Path, force: bool = False, quiet: bool = False) -> dict[str, object]:
    out = Path(out_dir)
    rec = recipe()
    digest = recipe_hash(rec)
    if not force and (info := cached_info(out, digest)) is not None:
        return {**info, "cached": True}
    start_build(out)
    stages = Stages(quiet)
    results: dict[str, dict[str, object]] = {}
    with fixed_threads(THREADS):
        with stages.stage("copy base"):
            base = _copy_base(out)
        for t, (name, task) in enumerate(TASKS.items()):
            data = out / "data" / name
            with stages.stage(f"{name}: data"):
                for s, (split, n) in enumerate(SPLITS.items()):
                    rows = generate(task, n, _split_seed(t, s), ood=split == "test_ood")
                    write_jsonl(data / f"{split}.jsonl", rows)
            common = {"seed": SEED, "max_length": MAX_LENGTH, "quiet": quiet, "overwrite": True}
            with stages.stage(f"{name}: linear probe"):
                finetune(base, out / f"probe-{name}", data / "train.jsonl", "classification",
                         **PROBE, **common)
            with stages.stage(f"{name}: fine-tune"):
                finetune(out / f"probe-{name}", out / f"ft-{name}", data / "train.jsonl",
                         "classification", **FINETUNE, **common)
            with stages.stage(f"{name}: evaluate"):
                scores = {
                    f"{model}_{split}": evaluate(out / f"{model}-{name}", data / f"{split}.jsonl",
                                                 "classification")["accuracy"]
                    for model in ("probe", "ft")
                    for split in ("test", "test_ood")
                }
            results[name] = {
                "metric": "accuracy",
                "base_model": f"probe-{name}",
                "model": f"ft-{name}",
                "labels": list(task.labels),
                "base": scores["probe_test"],
                "finetuned": scores["ft_test"],
                "base_ood": scores["probe_test_ood"],
                "finetuned_ood": scores["ft_test_ood"],
            }
    info = {
        "testbed": "minilm",
        "recipe": rec,
        "recipe_hash": digest,
        "versions": versions(),
        "base_source": str(minilm_dir()),
        "tasks": results,
        "stage_seconds": stages.times,
        "build_seconds": stages.total,
        "layout": {
            "base": "base/",
            "task_base": "probe-<task>/ (base encoder + linear-probe head)",
            "finetuned": "ft-<task>/ (head frozen from the probe)",
            "data": "data/<task>/{train,val,test,test_ood}.jsonl",
        },
    }
    write_info(out, info)
    return {**info, "cached": False}
