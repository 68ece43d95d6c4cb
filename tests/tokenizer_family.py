"""Tiny Llama checkpoints with fast tokenizers for tokenizer-merge tests: a base and two
fine-tunes that each added tokens of their own (one token, ``<both>``, added by both)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer
from wild_checkpoints import make_config, tensor_shapes, write_tokenizer

LAYERS = 2
# model name -> (tokens it adds with add_tokens, special tokens it adds)
ADDED = {
    "base": ([], []),
    "ft_a": (["alpha"], ["<|a_start|>", "<both>"]),
    "ft_b": (["beta", "gamma"], ["<|b_tool|>", "<both>"]),
}


def make_model(root: Path, name: str, seed: int) -> Path:
    """``root/name``: float32 weights from ``seed``, the 64-token base vocabulary plus ADDED."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    plain, special = ADDED[name]
    tok.add_tokens(plain)
    if special:
        tok.add_special_tokens({"additional_special_tokens": special})
    tok.save_pretrained(str(folder))
    config = make_config("llama", LAYERS)
    config["vocab_size"] = len(tok)
    config["torch_dtype"] = "float32"
    shapes = tensor_shapes("llama", LAYERS, tied=False)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            shape = (len(tok), *shape[1:])
        state[key] = (0.05 * torch.randn(shape, generator=g)).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def make_family(root: Path) -> dict[str, Path]:
    return {name: make_model(root, name, seed) for seed, name in enumerate(ADDED, start=11)}
