"""One-seed sanity check of the spectral merges on the example inputs (not a reproduction).

    python merges/build_inputs.py merges/inputs
    python benchmarks/spectral_sanity.py [--work /tmp/spectral_sanity]

Merges merges/inputs' two MiniLM fine-tunes (sentiment, topic) with each configuration below
through ``weightsmith merge`` (one thread), puts the merged encoder under each fine-tune's own
classifier head, and prints that task's held-out accuracy. Both fine-tunes score 1.000 alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from weightsmith.finetune import evaluate  # noqa: E402

TASKS = ("sentiment", "topic")
EMBEDDINGS_BY_MEAN = [{"filter": "embeddings", "value": False}, {"value": True}]
CONFIGS = {
    "task_arithmetic, lambda 1": ("task_arithmetic", {"lambda": 1.0}),
    "task_arithmetic, lambda 0.5": ("task_arithmetic", {"lambda": 0.5}),
    "ties, density 0.2, lambda 1": ("ties", {"lambda": 1.0, "density": 0.2}),
    "tsv, alpha 1": ("tsv", {"alpha": 1.0}),
    "iso_c, alpha 0.25": ("iso_c", {"alpha": 0.25}),
    "iso_c, alpha 0.5": ("iso_c", {"alpha": 0.5}),
    "iso_c, alpha 1": ("iso_c", {"alpha": 1.0}),
    "iso_c, alpha 1, embeddings by mean": ("iso_c", {"alpha": 1.0, "spectral": EMBEDDINGS_BY_MEAN}),
    "iso_c, alpha 2": ("iso_c", {"alpha": 2.0}),
    "iso_c, alpha 3": ("iso_c", {"alpha": 3.0}),
    "iso_cts, alpha 1": ("iso_cts", {"alpha": 1.0}),
    "iso_cts, alpha 3": ("iso_cts", {"alpha": 3.0}),
}


def merge_and_score(inputs: Path, work: Path, method: str, params: dict) -> dict[str, float]:
    recipe = {
        "merge_method": method,
        "base_model": str(inputs / "minilm-base"),
        "models": [{"model": str(inputs / f"minilm-{t}"), "parameters": {"weight": 1.0}} for t in TASKS],
        "parameters": params,
        "dtype": "float32",
        "out_dtype": "float32",
        "extra_keys": "ignore",  # the fine-tunes' heads
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = work / "merged"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "weightsmith.cli", "merge", str(work / "recipe.yaml"), str(out),
                    "--threads", "1", "-q"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    merged = load_file(str(out / "model.safetensors"))
    scores = {}
    for task in TASKS:
        fine_tune, folder = inputs / f"minilm-{task}", work / f"eval-{task}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(fine_tune, folder)
        state = load_file(str(fine_tune / "model.safetensors"))
        for name in state:  # the fine-tune wraps the encoder as bert.*; keep its head
            if name.startswith("bert.") and name[5:] in merged:
                state[name] = merged[name[5:]].to(state[name].dtype)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        data = inputs / "data" / task / "test.jsonl"
        scores[task] = evaluate(folder, data, "classification", max_length=32)["accuracy"]
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=Path, default=ROOT / "merges" / "inputs")
    ap.add_argument("--work", type=Path, default=Path("/tmp/spectral_sanity"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    print("| merge | sentiment | topic |\n|---|---|---|")
    results = {}
    for label, (method, params) in CONFIGS.items():
        results[label] = merge_and_score(args.inputs, args.work, method, params)
        print(f"| {label} | {results[label]['sentiment']:.3f} | {results[label]['topic']:.3f} |", flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
