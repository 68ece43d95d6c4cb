"""The output vocabulary of a merge (``tokenizer_source`` / the ``tokenizer:`` block) and, per
input model, where each output token's embedding row comes from.

mergekit 0.1.5's semantics, written from its documented behaviour:

* ``base``: the base's tokenizer (tokens at or past the base's ``vocab_size`` stripped);
  ``union``: the base's, plus every other model's tokens it lacks (plain tokens first, then
  added tokens with their settings, the first model's settings winning); a model: that model's
  tokenizer. Tokens named under ``tokens:`` are added if the output lacks them.
* A model that has a token keeps its own row. For a token some model lacks (or a rule with
  ``force``), every model gets one shared fill row: the rule's source if the token has one;
  else the one model that has it; else the base's row when the base has it; else the mean of
  the rows of the models that have it; zero when none has it.
* ``pad_to_multiple_of`` rounds the row count up; each model's padding rows are the mean of
  its own aligned rows.

Nothing here reads tensor data: the result is a row map per model (``VocabAlignment``) that the
plan turns into row gathers.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith.errors import RecipeError
from weightsmith.io.checkpoint import Checkpoint

# A fill row: the mean of these (model index, input row) rows; () is a zero row; None is a
# padding row, the mean of the model's own aligned rows.
Fill = tuple[tuple[int, int], ...] | None


@dataclass
class VocabAlignment:
    """Output vocabulary and, per model (checkpoint index), the input row of each output row:
    ``r >= 0`` is row ``r`` of that model's tensor, ``r < 0`` is ``fills[-1 - r]``."""

    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    vocab_len: int  # tokens in the output vocabulary
    rows: int  # output rows (vocab_len rounded up to pad_to_multiple_of)
    row_maps: dict[int, tuple[int, ...]]
    fills: list[Fill]
    input_rows: dict[int, int]  # each model's vocabulary size (rows of its vocab tensors)
    notes: list[str] = field(default_factory=list)

    def is_identity(self, index: int, have_rows: int) -> bool:
        """That model's rows are already the output's, in order."""
        return have_rows == self.rows and self.row_maps[index] == tuple(range(self.rows))


def load_tokenizer(ckpt: Checkpoint) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(ckpt.root), use_fast=True)
    except Exception as e:  # noqa: BLE001 - any load failure means the same thing here
        raise RecipeError(
            f"model {ckpt.ref!r} ({ckpt.root}): cannot load its tokenizer ({type(e).__name__}: {e}); "
            "a tokenizer merge needs tokenizer files (tokenizer.json, tokenizer_config.json) "
            "in every model's folder"
        ) from None


def vocab_size(ckpt: Checkpoint, tokenizer: Any) -> int:
    config = ckpt.config or {}
    for cfg in (config, config.get("text_config") or {}):
        if isinstance(cfg.get("vocab_size"), int):
            return int(cfg["vocab_size"])
    return len(tokenizer.get_vocab())


def _stripped(tokenizer: Any, size: int, ckpt: Checkpoint) -> Any:
    """The tokenizer without the tokens whose ids the model has no rows for."""
    unused = {tok for tok, idx in tokenizer.get_vocab().items() if idx >= size}
    if not unused:
        return tokenizer
    import tokenizers

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise RecipeError(
            f"model {ckpt.ref!r}: its tokenizer has {len(unused)} token(s) past vocab_size {size} "
            f"and is {spec['model']['type']}, not BPE; only BPE tokenizers can be trimmed for a merge"
        )
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < size]
    for tok in unused:
        spec["model"]["vocab"].pop(tok, None)
    spec["model"]["merges"] = [
        m for m in spec["model"]["merges"] if not set(m.split(" ") if isinstance(m, str) else m) & unused
    ]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    return tokenizer


def _copy(tokenizer: Any) -> Any:
    """A fresh tokenizer equal to ``tokenizer`` (adding tokens must not change the original)."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True)


def _union(base_pos: int, toks: dict[int, Any], sizes: dict[int, int]) -> Any:
    plain: dict[str, None] = {}  # ordered set
    added: dict[str, Any] = {}
    for idx, tok in toks.items():
        decoder = tok.added_tokens_decoder
        for word, tid in tok.get_vocab().items():
            if tid < sizes[idx]:
                plain.setdefault(word)
        for tid, info in decoder.items():
            if tid < sizes[idx]:
                added.setdefault(info.content, info)
    out = _copy(toks[base_pos])
    base_vocab = toks[base_pos].get_vocab()
    for word in plain:
        if word not in added and word not in base_vocab:
            out.add_tokens(word)
    for info in added.values():
        out.add_tokens(info)
    return out


def _model_index(ref: str, checkpoints: list[Checkpoint], involved: list[int], what: str) -> int:
    for idx in involved:
        if checkpoints[idx].ref == ref:
            return idx
    root = Path(ref).expanduser()
    for idx in involved:
        if root.exists() and root.resolve() == checkpoints[idx].root.resolve():
            return idx
    names = ", ".join(checkpoints[i].ref for i in involved)
    raise RecipeError(f"{what}: {ref!r} is not one of the recipe's models ({names})")


def build_alignment(
    checkpoints: list[Checkpoint],
    involved: list[int],
    base: int | None,
    spec: dict[str, Any],
    source_ckpt: Checkpoint | None,
) -> VocabAlignment:
    """The output tokenizer and row maps for the models ``involved`` (checkpoint indices, base
    first when there is one; duplicates of one model share its map). ``source_ckpt`` is the
    checkpoint named as the tokenizer source, when it is a model."""
    base_pos = involved[0] if base is None else base
    toks: dict[int, Any] = {}
    sizes: dict[int, int] = {}
    firsts: dict[str, int] = {}
    for idx in involved:
        ckpt = checkpoints[idx]
        if ckpt.ref in firsts:
            continue
        firsts[ckpt.ref] = idx
        tok = load_tokenizer(ckpt)
        sizes[idx] = vocab_size(ckpt, tok)
        toks[idx] = _stripped(tok, sizes[idx], ckpt) if idx == base_pos else tok
    source = spec["source"]
    if source == "base":
        out = _copy(toks[base_pos])
    elif source == "union":
        out = _union(base_pos, toks, sizes)
    else:
        assert source_ckpt is not None
        out = load_tokenizer(source_ckpt)
    rules: dict[str, dict[str, Any]] = spec.get("tokens") or {}
    have = set(out.get_vocab())
    for word in rules:
        if word not in have:
            out.add_tokens(word)
            have.add(word)
    vocab = out.get_vocab()
    vocab_len = len(vocab)
    pad = spec.get("pad_to_multiple_of")
    rows = -(-vocab_len // pad) * pad if pad else vocab_len
    if sorted(vocab.values()) != list(range(vocab_len)):
        raise RecipeError(
            f"tokenizer source {source!r}: the output vocabulary's ids are not 0..{vocab_len - 1}"
        )
    models = list(toks)
    perm = {i: _permutation(vocab, toks[i].get_vocab(), sizes[i]) for i in models}
    fills: list[Fill] = []
    shared: dict[int, int] = {}  # token id -> fill index
    order = sorted(vocab.items(), key=lambda kv: kv[1])
    for word, tid in order:
        rule = rules.get(word)
        missing = [i for i in models if perm[i][tid] < 0]
        if not missing and not (rule and rule["force"]):
            continue
        fill = _fill_for(word, tid, rule, models, perm, base, checkpoints, toks, involved)
        shared[tid] = len(fills)
        fills.append(fill)
    notes = [
        f"token {w!r} is in no model: zero row"
        for w, t in order
        if t in shared and fills[shared[t]] == () and w not in rules
    ]
    pad_fill = len(fills)
    if rows > vocab_len:
        fills.append(None)
    row_maps: dict[int, tuple[int, ...]] = {}
    for i in models:
        mapping = []
        for word, tid in order:
            rule = rules.get(word)
            own = perm[i][tid]
            mapping.append(own if own >= 0 and not (rule and rule["force"]) else -1 - shared[tid])
        mapping += [-1 - pad_fill] * (rows - vocab_len)
        row_maps[i] = tuple(mapping)
    for idx in involved:
        first = firsts[checkpoints[idx].ref]
        row_maps[idx], sizes[idx] = row_maps[first], sizes[first]
    lacking = sum(1 for f in fills if f is not None)
    notes.insert(
        0,
        f"tokenizer ({source}): {vocab_len} tokens, {rows} embedding rows; {lacking} token(s) some "
        "input lacks (or forced) get one shared row",
    )
    return VocabAlignment(out, vocab_len, rows, row_maps, fills, sizes, notes)


def _permutation(out_vocab: dict[str, int], model_vocab: dict[str, int], size: int) -> list[int]:
    """Output token id -> that model's row (-1: the model lacks the token or has no row for it)."""
    perm = [-1] * len(out_vocab)
    for word, tid in out_vocab.items():
        own = model_vocab.get(word, -1)
        perm[tid] = own if 0 <= own < size else -1
    return perm


def _fill_for(
    word: str,
    tid: int,
    rule: dict[str, Any] | None,
    models: list[int],
    perm: dict[int, list[int]],
    base: int | None,
    checkpoints: list[Checkpoint],
    toks: dict[int, Any],
    involved: list[int],
) -> Fill:
    holders = [i for i in models if perm[i][tid] >= 0]
    if rule is None:
        if len(holders) == 1 or (holders and base in holders):
            donor = holders[0] if len(holders) == 1 else base
            return ((donor, perm[donor][tid]),)
        return tuple((i, perm[i][tid]) for i in holders)  # the mean; () when none has it
    where = f"tokenizer.tokens[{word!r}]"
    if rule["kind"] == "zero":
        return ()
    idx = _model_index(rule["model"], checkpoints, involved, f"{where}.source")
    idx = next(i for i in models if checkpoints[i].ref == checkpoints[idx].ref)
    if rule["kind"] == "model":
        if perm[idx][tid] < 0:
            raise RecipeError(f"{where}: model {rule['model']!r} has no token {word!r} to take its row from")
        return ((idx, perm[idx][tid]),)
    row = rule["token_id"]
    if row is None:
        row = toks[idx].get_vocab().get(rule["token"], -1)
        if row < 0:
            raise RecipeError(f"{where}: model {rule['model']!r} has no token {rule['token']!r}")
    size = vocab_size(checkpoints[idx], toks[idx])
    if not 0 <= row < size:
        raise RecipeError(f"{where}: token_id {row} is out of range for {rule['model']!r} ({size} rows)")
    return ((idx, row),)
