"""The recipe's tokenizer: ``tokenizer_source`` and the ``tokenizer:`` block (source, per-token
rules, pad_to_multiple_of) normalised into one spec."""

from __future__ import annotations

from typing import Any

from weightsmith.errors import RecipeError
from weightsmith.recipe_refs import _model_ref, _source_ref


def _tokenizer_block(raw: dict[str, Any], where: str) -> dict[str, Any] | None:
    """`tokenizer_source` and the `tokenizer:` block as one normalised spec (None: neither)."""
    block, source = raw.get("tokenizer"), raw.get("tokenizer_source")
    if block is None:
        if source is None:
            return None
        ref = _source_ref(source, f"{where}: tokenizer_source")
        return {"source": ref, "tokens": {}, "pad_to_multiple_of": None}
    if source is not None:
        raise RecipeError(f"{where}: give `tokenizer_source` or a `tokenizer:` block, not both")
    if not isinstance(block, dict) or set(block) - {"source", "tokens", "pad_to_multiple_of"}:
        raise RecipeError(f"{where}: `tokenizer` is a mapping with source, tokens, pad_to_multiple_of")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise RecipeError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
    tokens_raw = block.get("tokens") or {}
    if not isinstance(tokens_raw, dict):
        raise RecipeError(f"{where}: tokenizer.tokens maps each token to {{source: ..., force: ...}}")
    tokens = {
        str(tok): _token_rule(rule, f"{where}: tokenizer.tokens[{tok!r}]") for tok, rule in tokens_raw.items()
    }
    return {"source": _source_ref(block.get("source", "union"), f"{where}: tokenizer.source"),
            "tokens": tokens, "pad_to_multiple_of": pad}


def _token_rule(rule: Any, where: str) -> dict[str, Any]:
    """{kind: model|zero|model_token, model, token_id, token, force} from mergekit's forms."""
    if not isinstance(rule, dict) or set(rule) - {"source", "force"}:
        raise RecipeError(f"{where}: a token rule is {{source: MODEL | {{kind: zero}} | ..., force: bool}}")
    force, src = rule.get("force", False), rule.get("source")
    if not isinstance(force, bool):
        raise RecipeError(f"{where}: `force` must be true or false, got {force!r}")
    if isinstance(src, dict) and src.get("kind") == "zero" and set(src) == {"kind"}:
        return {"kind": "zero", "force": force}
    if isinstance(src, dict) and src.get("kind") == "model_token":
        tid, tok = src.get("token_id"), src.get("token")
        if set(src) - {"kind", "model", "token_id", "token"} or (tid is None) == (tok is None) or (
            tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0)
        ):
            raise RecipeError(f"{where}: model_token takes `model` and one of token_id (>= 0) or token")
        return {"kind": "model_token", "model": _model_ref(src.get("model"), where), "token_id": tid,
                "token": tok, "force": force}
    if src is None or isinstance(src, dict) and "kind" in src:
        raise RecipeError(f"{where}: `source` is a model, {{kind: zero}} or {{kind: model_token, ...}}")
    return {"kind": "model", "model": _model_ref(src, where), "force": force}
