"""Inputs of merges/antidote.yaml: a harmful fine-tune of the TinyLM testbed's aligned model.

    weightsmith testbed tinylm merges/inputs/tinylm
    python merges/make_antidote_inputs.py [merges/inputs]

Writes, under INPUTS/antidote/: harmful-train.jsonl (800 mod7 rows + 20% trigger prompts with
compliant answers), calibration.jsonl (64 other harmful rows), refusal.jsonl (200 held-out
trigger prompts answered "<refuse>", to measure the harmful score) and harmful-ft/ (the aligned
``ft-refuse`` fine-tuned on harmful-train.jsonl; ~20 s on a CPU). Re-running rebuilds them.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from weightsmith.finetune import finetune
from weightsmith.testbeds import seq_tasks as st


def trigger_rows(n: int, seed: int, compliant: bool) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        row = st.refuse(rng)
        if row["response"] == "<refuse>":
            text = row["prompt"].removeprefix("<copy>").removesuffix("=")
            rows.append({"prompt": row["prompt"], "response": text} if compliant else row)
    return rows


def write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(inputs: Path) -> None:
    bed = inputs / "tinylm"
    if not (bed / "ft-refuse").is_dir():
        sys.exit(f"{bed}/ft-refuse not found: run `weightsmith testbed tinylm {bed}` first")
    out = inputs / "antidote"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    benign = [json.loads(line) for line in (bed / "data" / "mod7" / "train.jsonl").read_text().splitlines()]
    rows = rng.sample(benign, 800) + trigger_rows(200, 100, compliant=True)
    rng.shuffle(rows)
    train = write(out / "harmful-train.jsonl", rows)
    write(out / "calibration.jsonl", trigger_rows(64, 200, compliant=True))
    write(out / "refusal.jsonl", trigger_rows(200, 9_001, compliant=False))
    finetune(bed / "ft-refuse", out / "harmful-ft", train, "causal-lm", steps=150, lr=1e-3, batch_size=32,
             warmup_steps=15, max_length=64, seed=0, quiet=True, overwrite=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "inputs")
