"""Write the tokenizer-merge parity goldens (tests/data/parity/tokenizer/golden/) with mergekit.

    python benchmarks/parity/make_tokenizer_golden.py /path/to/mergekit-yaml

Builds the tiny tokenizer family (tests/tokenizer_family.py) in a temporary folder, runs each
recipe of tests/data/parity/tokenizer/ through mergekit, and keeps only what the test compares:
the vocabulary tensors and the output vocabulary (token -> id), plus the inputs' hashes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(HERE / "tests"), str(HERE)]

from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizer_family import make_family  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

DATA = HERE / "tests" / "data" / "parity" / "tokenizer"
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def main(mergekit: str) -> None:
    golden = DATA / "golden"
    golden.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        family = make_family(root / "models")
        hashes = {
            n: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest() for n, p in family.items()
        }
        (golden / "inputs.json").write_text(json.dumps(hashes, indent=2) + "\n")
        for recipe in sorted(DATA.glob("*.yaml")):
            text = recipe.read_text().replace("{root}", str(root / "models"))
            (root / recipe.name).write_text(text)
            out = root / recipe.stem
            subprocess.run([mergekit, str(root / recipe.name), str(out)], check=True)
            state = {}
            for shard in sorted(out.glob("*.safetensors")):
                state.update(load_file(str(shard)))
            save_file(
                {k: state[k].contiguous() for k in VOCAB_TENSORS}, str(golden / f"{recipe.stem}.safetensors")
            )
            vocab = AutoTokenizer.from_pretrained(str(out)).get_vocab()
            (golden / f"{recipe.stem}.vocab.json").write_text(
                json.dumps(vocab, indent=1, sort_keys=True) + "\n"
            )


if __name__ == "__main__":
    main(sys.argv[1])
