"""A character-level tokenizer saved in Hugging Face format, built fully offline.

Each ordinary character is one token; marker tokens such as ``<copy>`` are special added tokens
so they are never split. The result loads with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from weightsmith.finetune._deps import require_transformers

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_char_tokenizer(chars: str, markers: Sequence[str] = ()):
    """Return a ``PreTrainedTokenizerFast``: ids 0-3 are pad/bos/eos/unk, then chars, markers."""
    transformers = require_transformers()
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if len(set(chars)) != len(chars):
        raise ValueError("duplicate characters in the tokenizer alphabet")
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    for marker in markers:
        vocab[marker] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Split into single characters; added (special) tokens are matched before this runs.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # decode without spaces between characters
    tok.add_special_tokens(list(SPECIALS) + list(markers))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def save_char_tokenizer(out_dir: str | Path, chars: str, markers: Sequence[str] = ()):
    tokenizer = build_char_tokenizer(chars, markers)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
