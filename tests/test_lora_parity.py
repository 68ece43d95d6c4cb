"""Parity with mergekit 0.1.5 for recipes with LoRA references (``BASE+ADAPTER``).

The golden under tests/data/lora_parity/ is what ``mergekit-yaml`` wrote for the recipe below
(mergekit merges each adapter with peft's merge_and_unload into a cache folder, then merges).
The inputs are rebuilt deterministically (torch generators, hand-written PEFT adapter files)
and checked against the digests recorded with the golden. Regenerate with

    WEIGHTSMITH_MERGEKIT=/path/to/mergekit-yaml PYTHONPATH=. python tests/test_lora_parity.py

Set WEIGHTSMITH_MERGEKIT when running pytest to also compare with mergekit live.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.mergekit_parity import bf16_steps, hash_tensors, run_mergekit_yaml, write_char_tokenizer
from tests.models import LLAMA_CONFIG, load_folder, random_state, save_model

DATA = Path(__file__).parent / "data" / "lora_parity"
GOLDEN = DATA / "task_arithmetic_lora.safetensors"
DIGESTS = DATA / "inputs.json"
CONFIG = {**LLAMA_CONFIG, "num_hidden_layers": 4}
ADAPTERS: dict[str, dict[str, Any]] = {
    "ad1": {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 16}, "dtype": "bfloat16",
    },
    "ad2": {
        "r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["o_proj", "gate_proj"],
        "modules_to_save": ["lm_head"], "dtype": "float32",
    },
}


def write_adapter(folder: Path, base_state: dict[str, torch.Tensor], seed: int, spec: dict[str, Any]) -> Path:
    """A PEFT LoRA adapter folder as peft 0.21's save_pretrained writes it, from a seed."""
    import re

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec["dtype"])
    tensors: dict[str, torch.Tensor] = {}
    for key, w in base_state.items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in spec["target_modules"]:
            continue
        r = next((v for p, v in spec.get("rank_pattern", {}).items() if re.match(rf"(.*\.)?({p})$", module)),
                 spec["r"])
        a = 0.2 * torch.randn(r, w.shape[1], generator=g)
        b = 0.2 * torch.randn(w.shape[0], r, generator=g)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype)
    for module in spec.get("modules_to_save", []):
        w = base_state[f"{module}.weight"]
        noise = 0.05 * torch.randn(w.shape, generator=g)
        tensors[f"base_model.model.{module}.weight"] = w + noise.to(w.dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": spec["r"], "lora_alpha": spec["lora_alpha"], "target_modules": spec["target_modules"],
        "rank_pattern": spec.get("rank_pattern", {}), "alpha_pattern": spec.get("alpha_pattern", {}),
        "use_rslora": spec.get("use_rslora", False), "modules_to_save": spec.get("modules_to_save"),
        "fan_in_fan_out": False, "bias": "none", "lora_dropout": 0.0, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def build_inputs(root: Path) -> dict[str, Path]:
    base_state = random_state(CONFIG, seed=0)
    base = save_model(root / "base", base_state, CONFIG, shards=2, tokenizer=False)
    write_char_tokenizer(base, CONFIG["vocab_size"], digits=False)
    folders = {"base": base}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        folders[name] = write_adapter(root / name, base_state, seed=10 + i, spec=spec)
    return folders


def recipe(folders: dict[str, Path]) -> dict[str, Any]:
    base = str(folders["base"].resolve())
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        # mergekit computes in `dtype`: float32 arithmetic, bf16 output, as the other parity recipes
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "models": [
            {"model": f"{base}+{folders['ad1'].resolve()}", "parameters": {"weight": 0.6}},
            {"model": f"{base}+{folders['ad2'].resolve()}", "parameters": {"weight": 0.4}},
        ],
    }


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        hash_tensors(h, sorted(load_file(str(f)).items()))
    for f in sorted(folder.glob("adapter_config.json")):
        h.update(f.read_bytes())
    return h.hexdigest()


def run_mergekit(exe: str, folders: dict[str, Path], out: Path) -> dict[str, torch.Tensor]:
    out.parent.mkdir(parents=True, exist_ok=True)
    run_mergekit_yaml(exe, recipe(folders), out.parent / "recipe.yaml", out,
                      "--lora-merge-cache", str(out.parent / "lora-cache"))
    return load_folder(out)


def ours(folders: dict[str, Path], out: Path) -> dict[str, torch.Tensor]:
    import weightsmith

    weightsmith.merge(recipe(folders), out, progress=False)
    return load_folder(out)


def test_lora_reference_recipe_matches_mergekit_golden(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    folders = build_inputs(tmp_path / "in")
    recorded = json.loads(DIGESTS.read_text())
    assert {name: digest(f) for name, f in folders.items()} == recorded["sha256"], (
        "the rebuilt inputs differ from those the golden was made from; regenerate the golden"
    )
    got, want = ours(folders, tmp_path / "out"), load_file(str(GOLDEN))
    assert set(got) == set(want)
    steps = {k: bf16_steps(got[k], want[k]) for k in want}
    assert max(steps.values()) == 0, {k: s for k, s in steps.items() if s}  # measured: bit-identical
    base = load_folder(folders["base"])
    assert not torch.equal(got["lm_head.weight"], base["lm_head.weight"])  # modules_to_save applied
    down = "model.layers.3.mlp.down_proj.weight"
    assert not torch.equal(got[down], base[down])


@pytest.mark.skipif(not os.environ.get("WEIGHTSMITH_MERGEKIT"), reason="set WEIGHTSMITH_MERGEKIT to run live")
def test_lora_reference_recipe_matches_mergekit_live(tmp_path: Path) -> None:
    folders = build_inputs(tmp_path / "in")
    want = run_mergekit(os.environ["WEIGHTSMITH_MERGEKIT"], folders, tmp_path / "mk" / "out")
    got = ours(folders, tmp_path / "out")
    assert max(bf16_steps(got[k], want[k]) for k in want) == 0


if __name__ == "__main__":  # regenerate the golden with mergekit
    import tempfile

    exe = os.environ.get("WEIGHTSMITH_MERGEKIT")
    if not exe:
        sys.exit("set WEIGHTSMITH_MERGEKIT=/path/to/mergekit-yaml")
    with tempfile.TemporaryDirectory() as tmp:
        folders = build_inputs(Path(tmp) / "in")
        out = run_mergekit(exe, folders, Path(tmp) / "mk" / "out")
        DATA.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in out.items()}, str(GOLDEN), metadata={"format": "pt"})
        DIGESTS.write_text(json.dumps({
            "about": "digests of the inputs build_inputs() makes; the golden is mergekit-yaml 0.1.5's output",
            "sha256": {name: digest(f) for name, f in folders.items()},
        }, indent=2) + "\n")
        print(f"wrote {GOLDEN} ({len(out)} tensors) and {DIGESTS}")
