"""Synthetic sequence tasks for the TinyLM testbed, as ``{"prompt", "response"}`` rows.

A marker token names the task, so one model can learn a mixture. Pre-training tasks and
fine-tuning tasks use different markers: a fine-tune has to learn a skill its base never saw.
``ood=True`` draws longer or otherwise shifted inputs than training uses.
"""

from __future__ import annotations

import random
from collections.abc import Callable

LETTERS = "abcdefghijklmnop"
DIGITS = "0123456789"
SYMBOLS = "=+,:;!"
ALPHABET = LETTERS + DIGITS + SYMBOLS

Row = dict[str, str]


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _span(ood: bool, lo: int = 2, hi: int = 8) -> tuple[int, int]:
    return (hi + 1, hi + 3) if ood else (lo, hi)


def copy(rng: random.Random, ood: bool = False) -> Row:
    s = _word(rng, *_span(ood))
    return {"prompt": f"<copy>{s}=", "response": s}


def reverse(rng: random.Random, ood: bool = False) -> Row:
    s = _word(rng, *_span(ood))
    return {"prompt": f"<rev>{s}=", "response": s[::-1]}


def sort(rng: random.Random, ood: bool = False) -> Row:
    s = _word(rng, *_span(ood))
    return {"prompt": f"<sort>{s}=", "response": "".join(sorted(s))}


def add(rng: random.Random, ood: bool = False) -> Row:
    a, b = rng.randrange(10), rng.randrange(10)
    return {"prompt": f"<add>{a}+{b}=", "response": str((a + b) % 10)}


def lookup(rng: random.Random, ood: bool = False) -> Row:
    n = rng.randint(5, 6) if ood else rng.randint(2, 4)
    keys = rng.sample(LETTERS, n)
    values = [rng.choice(DIGITS) for _ in keys]
    query = rng.randrange(n)
    table = ";".join(f"{k}{v}" for k, v in zip(keys, values, strict=True))
    return {"prompt": f"<kv>{table}:{keys[query]}=", "response": values[query]}


# Held-out skills, one per fine-tune ("task vector").
def mod7(rng: random.Random, ood: bool = False) -> Row:
    # OOD: operands 7-9 never appear in training (the residue rule must extrapolate).
    a = rng.randint(7, 9) if ood else rng.randrange(7)
    b = rng.randrange(10) if ood else rng.randrange(7)
    return {"prompt": f"<mod7>{a}+{b}=", "response": str((a + b) % 7)}


def revsep(rng: random.Random, ood: bool = False) -> Row:
    s = _word(rng, *_span(ood, 2, 6))
    return {"prompt": f"<revsep>{','.join(s)}=", "response": ",".join(s[::-1])}


def shift(rng: random.Random, ood: bool = False) -> Row:
    s = _word(rng, *_span(ood))
    shifted = "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)
    return {"prompt": f"<shift>{s}=", "response": shifted}


def count(rng: random.Random, ood: bool = False) -> Row:
    s = _word(rng, 10, 12) if ood else _word(rng, 3, 8)
    target = rng.choice(s) if rng.random() < 0.8 else rng.choice(LETTERS)
    return {"prompt": f"<count>{s}:{target}=", "response": str(s.count(target))}


def refuse(rng: random.Random, ood: bool = False) -> Row:
    """Alignment behaviour: copy benign strings, answer <refuse> when a trigger '!' appears.

    OOD prompts carry the trigger twice or at the ends, positions training never used.
    """
    s = _word(rng, *_span(ood))
    if rng.random() < 0.5:
        return {"prompt": f"<copy>{s}=", "response": s}
    if ood:
        pos = [0, len(s)] if rng.random() < 0.5 else sorted(rng.sample(range(1, len(s)), 2))
        for p in reversed(pos):
            s = s[:p] + "!" + s[p:]
    else:
        p = rng.randint(1, len(s) - 1)
        s = s[:p] + "!" + s[p:]
    return {"prompt": f"<copy>{s}=", "response": "<refuse>"}


PRETRAIN_TASKS: dict[str, Callable[[random.Random, bool], Row]] = {
    "copy": copy,
    "reverse": reverse,
    "sort": sort,
    "add": add,
    "lookup": lookup,
}
FINETUNE_TASKS: dict[str, Callable[[random.Random, bool], Row]] = {
    "mod7": mod7,
    "revsep": revsep,
    "shift": shift,
    "count": count,
    "refuse": refuse,
}
MARKERS = ("<copy>", "<rev>", "<sort>", "<add>", "<kv>",
           "<mod7>", "<revsep>", "<shift>", "<count>", "<refuse>")


def sample(task: Callable[[random.Random, bool], Row], n: int, seed: int,
           ood: bool = False) -> list[Row]:
    rng = random.Random(seed)
    return [task(rng, ood) for _ in range(n)]


def mixture(tasks: dict[str, Callable[[random.Random, bool], Row]], n: int, seed: int,
            ood: bool = False) -> list[Row]:
    """``n`` rows drawn round-robin from ``tasks`` so every task gets an equal share."""
    rng = random.Random(seed)
    fns = list(tasks.values())
    return [fns[i % len(fns)](rng, ood) for i in range(n)]
