"""Tensor names across inputs: layer indices, tied-weight aliases, key prefixes, and shapes.

How each output tensor is found in each input (a fine-tune may wrap its base's names in a
prefix, or keep only one of two tied matrices), and whether the inputs' shapes agree or differ
only in vocabulary rows (``vocab_policy``).
"""

from __future__ import annotations

import re

import torch

from weightsmith.engine.tasks import Source
from weightsmith.errors import MergeError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.recipe import Recipe

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)\.")


# Output key -> input keys that hold the same tensor when weights are tied.
TIED_ALIASES: dict[str, tuple[str, ...]] = {
    "lm_head.weight": (
        "model.embed_tokens.weight",
        "transformer.wte.weight",
        "embed_tokens.weight",
    ),
    "model.embed_tokens.weight": ("lm_head.weight",),
    "cls.predictions.decoder.weight": ("bert.embeddings.word_embeddings.weight",),
    "embed_out.weight": ("gpt_neox.embed_in.weight",),
}


VOCAB_NAME = re.compile(r"embed|lm_head|wte|word_embeddings|embed_out|shared\.weight|decoder\.weight")


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_index(name: str) -> int | None:
    m = LAYER_PATTERN.search(name)
    return int(m.group(1)) if m else None


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _sort_key(name: str) -> tuple[int, int, str]:
    idx = layer_index(name)
    if idx is not None:
        return (1, idx, name)
    return (0 if VOCAB_NAME.search(name) and "lm_head" not in name else 2, 0, name)


def _is_alias_only(key: str, used: set[str]) -> bool:
    return any(key in aliases and out in used for out, aliases in TIED_ALIASES.items())


def key_prefix_map(ref_keys: list[str], ckpt: Checkpoint) -> tuple[str, str]:
    """How this input names the reference's tensors: (prefix to strip, prefix to add).

    A fine-tuned task model often wraps the encoder it started from (``bert.`` before every
    name of a ``BertModel`` base, plus a new head); mapping by a common prefix lets such
    checkpoints merge with their base without renaming files.
    """
    keys = set(ckpt.keys())
    if sum(k in keys for k in ref_keys) * 2 >= len(ref_keys):
        return ("", "")
    best, best_hits = ("", ""), sum(k in keys for k in ref_keys)
    adds = {k.split(".", 1)[0] + "." for k in keys if "." in k}
    strips = {k.split(".", 1)[0] + "." for k in ref_keys if "." in k}
    candidates = [("", a) for a in adds] + [(s, "") for s in strips]
    candidates += [(s, a) for s in strips for a in adds if s != a]
    for strip, add in candidates:
        hits = sum(
            k.startswith(strip) and add + k[len(strip) :] in keys for k in ref_keys
        )
        if hits > best_hits:
            best, best_hits = (strip, add), hits
    return best if best_hits * 2 >= len(ref_keys) else ("", "")


def _find_key(ckpt: Checkpoint, name: str, prefix: tuple[str, str] = ("", "")) -> str | None:
    strip, add = prefix
    mapped = add + name[len(strip) :] if name.startswith(strip) else name
    for candidate in (mapped, name):
        if candidate in ckpt:
            return candidate
    tie = (ckpt.config or {}).get("tie_word_embeddings", True)
    for alias in TIED_ALIASES.get(name, ()):
        mapped_alias = add + alias[len(strip) :] if alias.startswith(strip) else alias
        for candidate in (mapped_alias, alias):
            if candidate in ckpt and tie:
                return candidate
    return None


def _num_layers(ckpt: Checkpoint) -> int | None:
    config = ckpt.config or {}
    for cfg in (config, config.get("text_config") or {}):
        for key in LAYER_COUNT_KEYS:
            if isinstance(cfg.get(key), int):
                return int(cfg[key])
    indices = [i for i in (layer_index(k) for k in ckpt.keys()) if i is not None]
    return max(indices) + 1 if indices else None


def _align_shapes(
    recipe: Recipe,
    checkpoints: list[Checkpoint],
    name: str,
    ref_shape: tuple[int, ...],
    sources: list[Source],
    base: Source | None,
) -> tuple[tuple[int, ...], list[Source], Source | None]:
    """Check all inputs agree on shape; apply vocab_policy to vocabulary-sized tensors."""
    every = ([base] if base else []) + sources
    shapes = [checkpoints[s.ckpt].entry(s.key).shape for s in every]
    if all(s == ref_shape for s in shapes):
        return ref_shape, sources, base
    for src, shape in zip(every, shapes):
        if shape != ref_shape and (len(shape) != len(ref_shape) or shape[1:] != ref_shape[1:] or not shape):
            ckpt = checkpoints[src.ckpt]
            raise MergeError(
                f"model {ckpt.ref!r} ({ckpt.entry(src.key).path}): tensor {src.key!r} has shape "
                f"{list(shape)} but the reference has {list(ref_shape)}; these models do not share "
                "an architecture"
            )
    vocab_like = bool(VOCAB_NAME.search(name)) or any(
        (checkpoints[s.ckpt].config or {}).get("vocab_size") == sh[0] for s, sh in zip(every, shapes)
    )
    rows = [sh[0] for sh in shapes]
    odd = next(s for s, sh in zip(every, shapes) if sh != ref_shape)
    if not vocab_like or recipe.vocab_policy == "error":
        ckpt = checkpoints[odd.ckpt]
        hint = (
            "the vocabulary sizes differ: set `vocab_policy: pad` (zero rows for missing tokens) "
            "or `vocab_policy: truncate` (keep the common token-ID prefix) in the recipe"
            if vocab_like
            else "these models do not share an architecture"
        )
        raise MergeError(
            f"model {ckpt.ref!r} ({ckpt.entry(odd.key).path}): tensor {odd.key!r} has "
            f"{checkpoints[odd.ckpt].entry(odd.key).shape[0]} rows but the reference has "
            f"{ref_shape[0]}; {hint}"
        )
    out_rows = max(rows) if recipe.vocab_policy == "pad" else min(rows)
    fixed = [Source(s.ckpt, s.key, r) for s, r in zip(every, rows)]
    new_base = fixed[0] if base else None
    return (out_rows, *ref_shape[1:]), fixed[1:] if base else fixed, new_base
