"""TinyLM testbed: a character-level Llama trained from scratch, then one fine-tune per skill.

Layout::

    OUT/init/                 seeded random initialisation (tokenizer + config + weights)
    OUT/base/                 pre-trained on the mixture copy/reverse/sort/add/lookup
    OUT/base-v2/              base continued on more, longer mixture data (for transfer)
    OUT/ft-<task>/            base fine-tuned on one held-out skill (mod7, revsep, shift,
                              count, refuse)
    OUT/data/pretrain/{train,val-<task>}.jsonl, OUT/data/pretrain-v2/train.jsonl
    OUT/data/<task>/{train,val,test,test_ood}.jsonl
    OUT/testbed.json
"""

from __future__ import annotations

from pathlib import Path

import torch

from weightsmith.finetune._deps import quiet_transformers, require_transformers
from weightsmith.finetune.evaluation import evaluate
from weightsmith.finetune.runtime import fixed_threads
from weightsmith.finetune.trainer import finetune
from weightsmith.testbeds import seq_tasks as st
from weightsmith.testbeds.char_tokenizer import save_char_tokenizer
from weightsmith.testbeds.common import (
    Stages,
    cached_info,
    recipe_hash,
    start_build,
    versions,
    write_info,
    write_jsonl,
)

RECIPE_VERSION = 1

MODEL = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}
PRETRAIN = {"examples": 24_000, "steps": 1200, "lr": 3e-3, "batch_size": 64,
            "warmup_steps": 60, "weight_decay": 0.01}
# v2 continues v1 on a different distribution (half longer strings): linearly connected to v1.
PRETRAIN_V2 = {"examples": 8_000, "steps": 300, "lr": 1e-3, "batch_size": 64,
               "warmup_steps": 20, "weight_decay": 0.01, "ood_fraction": 0.5}
FINETUNE = {"steps": 200, "lr": 1e-3, "batch_size": 32, "warmup_steps": 20}
SPLITS = {"train": 2000, "val": 200, "test": 200, "test_ood": 200}
VAL_PER_PRETRAIN_TASK = 100
MAX_LENGTH = 64
SEED = 0
THREADS = 1


def recipe() -> dict[str, object]:
    v = versions()
    return {
        "testbed": "tinylm",
        "recipe_version": RECIPE_VERSION,
        "model": MODEL,
        "alphabet": st.ALPHABET,
        "markers": list(st.MARKERS),
        "pretrain_tasks": list(st.PRETRAIN_TASKS),
        "finetune_tasks": list(st.FINETUNE_TASKS),
        "pretrain": PRETRAIN,
        "pretrain_v2": PRETRAIN_V2,
        "finetune": FINETUNE,
        "splits": SPLITS,
        "max_length": MAX_LENGTH,
        "seed": SEED,
        "threads": THREADS,
        "versions": {k: v[k] for k in ("torch", "transformers", "tokenizers") if k in v},
    }


def _init_model(out: Path) -> Path:
    transformers = require_transformers()
    init = out / "init"
    tokenizer = save_char_tokenizer(init, st.ALPHABET, st.MARKERS)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=MODEL["num_attention_heads"],
        # Untied output layer: embedding and unembedding then merge as independent tensors.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = transformers.LlamaForCausalLM(config)
    with quiet_transformers():
        model.save_pretrained(str(init))
    return init


def _pretrain_v2_rows(seed: int) -> list[dict[str, str]]:
    n = PRETRAIN_V2["examples"]
    n_long = int(n * PRETRAIN_V2["ood_fraction"])
    rows = st.mixture(st.PRETRAIN_TASKS, n - n_long, seed)
    rows += st.mixture(st.PRETRAIN_TASKS, n_long, seed + 1, ood=True)
    return rows


def _train_kwargs(spec: dict[str, object]) -> dict[str, object]:
    keys = ("steps", "lr", "batch_size", "warmup_steps", "weight_decay")
    return {k: spec[k] for k in keys if k in spec}


def _exact_match(model_dir: Path, data: Path) -> float:
    return float(evaluate(model_dir, data, "causal-lm", batch_size=64)["exact_match"])


def build(out_dir: str | Path, force: bool = False, quiet: bool = False) -> dict[str, object]:
    out = Path(out_dir)
    rec = recipe()
    digest = recipe_hash(rec)
    if not force and (info := cached_info(out, digest)) is not None:
        return {**info, "cached": True}
    start_build(out)
    stages = Stages(quiet)
    common = {"seed": SEED, "max_length": MAX_LENGTH, "quiet": quiet, "overwrite": True}
    data = out / "data"
    with fixed_threads(THREADS):
        with stages.stage("data"):
            pre = write_jsonl(data / "pretrain" / "train.jsonl",
                              st.mixture(st.PRETRAIN_TASKS, PRETRAIN["examples"], SEED + 1))
            for i, (name, fn) in enumerate(st.PRETRAIN_TASKS.items()):
                write_jsonl(data / "pretrain" / f"val-{name}.jsonl",
                            st.sample(fn, VAL_PER_PRETRAIN_TASK, SEED + 100 + i))
            pre_v2 = write_jsonl(data / "pretrain-v2" / "train.jsonl",
                                 _pretrain_v2_rows(SEED + 2))
            for t, (name, fn) in enumerate(st.FINETUNE_TASKS.items()):
                for s, (split, n) in enumerate(SPLITS.items()):
                    rows = st.sample(fn, n, SEED * 10_000 + 1000 + t * 100 + s,
                                     ood=split == "test_ood")
                    write_jsonl(data / name / f"{split}.jsonl", rows)
        with stages.stage("init"):
            init = _init_model(out)
        with stages.stage("pretrain base"):
            finetune(init, out / "base", pre, "causal-lm", **_train_kwargs(PRETRAIN), **common)
        with stages.stage("pretrain base-v2"):
            finetune(out / "base", out / "base-v2", pre_v2, "causal-lm",
                     **_train_kwargs(PRETRAIN_V2), **common)
        pretraining = {}
        with stages.stage("evaluate pretraining"):
            for name in st.PRETRAIN_TASKS:
                val = data / "pretrain" / f"val-{name}.jsonl"
                pretraining[name] = {
                    "base": _exact_match(out / "base", val),
                    "base-v2": _exact_match(out / "base-v2", val),
                    "init": _exact_match(init, val),
                }
        results: dict[str, dict[str, object]] = {}
        for name in st.FINETUNE_TASKS:
            with stages.stage(f"{name}: fine-tune"):
                finetune(out / "base", out / f"ft-{name}", data / name / "train.jsonl",
                         "causal-lm", **FINETUNE, **common)
            with stages.stage(f"{name}: evaluate"):
                scores = {
                    f"{label}_{split}": _exact_match(model, data / name / f"{split}.jsonl")
                    for label, model in (("base", out / "base"), ("ft", out / f"ft-{name}"))
                    for split in ("test", "test_ood")
                }
            results[name] = {
                "metric": "exact_match",
                "base_model": "base",
                "model": f"ft-{name}",
                "base": scores["base_test"],
                "finetuned": scores["ft_test"],
                "base_ood": scores["base_test_ood"],
                "finetuned_ood": scores["ft_test_ood"],
            }
    info = {
        "testbed": "tinylm",
        "recipe": rec,
        "recipe_hash": digest,
        "versions": versions(),
        "pretraining": pretraining,
        "tasks": results,
        "stage_seconds": stages.times,
        "build_seconds": stages.total,
        "layout": {
            "init": "init/",
            "base": "base/",
            "base_v2": "base-v2/ (base continued on longer strings)",
            "finetuned": "ft-<task>/ (fine-tuned from base)",
            "data": "data/<task>/{train,val,test,test_ood}.jsonl, data/pretrain*/",
        },
    }
    write_info(out, info)
    return {**info, "cached": False}
