"""Seconds-fast random-weight checkpoints for unit tests (no training, no downloads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from weightsmith.finetune._deps import quiet_transformers, require_transformers
from weightsmith.finetune.modeling import TOKENIZER_FILES
from weightsmith.testbeds.char_tokenizer import save_char_tokenizer
from weightsmith.testbeds.paths import minilm_dir
from weightsmith.testbeds.seq_tasks import ALPHABET, MARKERS


def make_tiny_llama(
    out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2
) -> Path:
    """A randomly initialised LlamaForCausalLM with the TinyLM character tokenizer."""
    transformers = require_transformers()
    out_dir = Path(out_dir)
    tokenizer = save_char_tokenizer(out_dir, ALPHABET, MARKERS)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    with quiet_transformers():
        model.save_pretrained(str(out_dir))
    return out_dir


def make_tiny_bert(
    out_dir: str | Path, num_labels: int | None = None, seed: int = 0, hidden: int = 32,
    layers: int = 2,
) -> Path:
    """A random small BERT using the packaged MiniLM tokenizer.

    ``num_labels=None`` saves a bare ``BertModel`` (like the MiniLM checkpoint); otherwise a
    ``BertForSequenceClassification`` with that many classes.
    """
    transformers = require_transformers()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = minilm_dir()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=128,
        num_labels=num_labels or 2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if num_labels is None:
            model = transformers.BertModel(config)
        else:
            model = transformers.BertForSequenceClassification(config)
    with quiet_transformers():
        model.save_pretrained(str(out_dir))
    return out_dir
