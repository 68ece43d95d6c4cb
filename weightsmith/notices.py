"""Warnings that reach users: one helper, so every one prints the same way and can be collected.

``warn`` prints ``weightsmith: warning: ...`` on stderr. Inside ``collecting()`` (the pipeline
wraps each plan and merge in one) the messages are also recorded, so the Python API returns them
(``MergePlan.warnings``) and tests assert them; a message repeated inside the outermost
collection (a plan built twice: greedy soups re-plan) prints once. ``lenient`` is the one place
where "mergekit ignores this" becomes a warning, or, under ``strict``, an error.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from weightsmith.errors import RecipeError

# The collections open in this context, outermost first, each with whether it prints.
_ACTIVE: ContextVar[tuple[tuple[list[str], bool], ...]] = ContextVar("weightsmith_notices", default=())


def warn(message: str) -> None:
    """Print one warning line (once per outermost collection) and record it in each open one."""
    active = _ACTIVE.get()
    echo = all(prints for _, prints in active)
    if echo and (not active or message not in active[0][0]):
        print(f"weightsmith: warning: {message}", file=sys.stderr, flush=True)
    for collected, _ in active:
        if message not in collected:
            collected.append(message)


@contextmanager
def collecting(echo: bool = True) -> Iterator[list[str]]:
    """Record the warnings given inside the block into the yielded list (in order, distinct);
    ``echo=False``: record without printing (they were said already, e.g. when a multi-stage
    recipe's stages were all checked before any work)."""
    collected: list[str] = []
    token = _ACTIVE.set((*_ACTIVE.get(), (collected, echo)))
    try:
        yield collected
    finally:
        _ACTIVE.reset(token)


def lenient(message: str, strict: bool) -> None:
    """Something mergekit silently ignores: a warning ending in "ignored", or under ``strict``
    an error with the same text."""
    if strict:
        raise RecipeError(f"{message} (--strict: mergekit would ignore it; remove or fix it)")
    warn(f"{message} ignored" if message.endswith("?") else f"{message}; ignored")


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``"; did you mean `x`?"`` for the closest known name, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""
