"""Helpers of the mergekit parity tests (test_parity_mergekit.py, test_lora_parity.py and the
tests that import from them): inputs mergekit can load, running ``mergekit-yaml`` offline,
digests of rebuilt inputs, and comparing bf16 outputs with mergekit's goldens."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml


def write_char_tokenizer(folder: Path, vocab_size: int, digits: bool = True) -> None:
    """A word-level tokenizer with one token per character (a-z, then 0-9 with ``digits``),
    saved as tokenizer.json + config, so transformers (and mergekit) can load the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    chars = [chr(ord("a") + i) for i in range(26)] + ([str(i) for i in range(10)] if digits else [])
    tokens = (specials + chars)[:vocab_size]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))


def hash_tensors(h: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Feed (name, tensor) pairs to hashlib object ``h``: name, dtype, shape, then the raw bytes
    (the digests recorded beside the goldens are made this way)."""
    for key, t in tensors:
        t = t.contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def run_mergekit_yaml(exe: str, recipe: dict[str, Any], config: Path, out: Path, *args: str) -> Path:
    """Write ``recipe`` to ``config`` and run ``mergekit-yaml config out *args`` offline."""
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([exe, str(config), str(out), *args], check=True, env=env, capture_output=True, text=True)
    return out


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns mapped to integers that are consecutive for adjacent bf16 values."""
    bits = t.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def bf16_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between two bf16 tensors in representable values (0: bit-identical)."""
    return int((ordered_bits(a) - ordered_bits(b)).abs().max()) if a.numel() else 0
