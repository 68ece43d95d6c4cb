"""Greedy soup selection (Wortsman et al. 2022, mlfoundations/model-soups main.py).

1. Score every ingredient alone on held-out data; sort best first (ties: recipe order).
2. The soup starts as the best ingredient.
3. For each next ingredient, once, in that order: candidate = soup * n/(n+1) + theta_i/(n+1)
   (n = ingredients in the soup); keep it if its held-out score is strictly better than the
   soup's (the reference code's ``>``; the paper's pseudo-code says ``>=``).

Memory: at any time at most the running soup and one candidate are resident (plus the
evaluator's own model). Ingredients are streamed tensor by tensor from their checkpoints, both
when scored alone and when mixed into a candidate; the candidate is built from the soup and the
streamed tensors, and whichever of soup and candidate loses is dropped before the next step.

This module only chooses; ``weightsmith/data_steps.py`` runs it for ``merge_method: soup`` with
``mode: greedy`` and the normal streamed merge then writes the uniform average of the chosen
ingredients (equal to the running average up to float32 rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from weightsmith.errors import MergeError

Weights = Mapping[str, torch.Tensor] | Callable[[], Iterable[tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class GreedyResult:
    scores: tuple[float, ...]  # each ingredient alone, in input order
    order: tuple[int, ...]  # input indices, best first
    steps: tuple[tuple[int, float, bool], ...]  # (ingredient, candidate score, accepted)
    chosen: tuple[int, ...]  # input indices in the order they joined the soup
    score: float  # the final soup's held-out score


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    """Strict improvement; a NaN score never improves anything."""
    return a > b if higher_is_better else a < b


def rank(scores: Sequence[float], higher_is_better: bool) -> list[int]:
    """Indices best first; stable (equal scores keep input order), NaN last."""

    def key(i: int) -> float:
        s = scores[i]
        if math.isnan(s):
            return math.inf
        return -s if higher_is_better else s

    return sorted(range(len(scores)), key=key)


def greedy_soup(
    count: int,
    load: Callable[[int], Iterable[tuple[str, torch.Tensor]]],
    score: Callable[[Weights], float],
    higher_is_better: bool = True,
    log: Callable[[str], None] | None = None,
    names: Sequence[str] | None = None,
) -> GreedyResult:
    """Choose ingredients greedily.

    ``load(i)`` streams ingredient i's floating tensors as ``(name, tensor)`` pairs (fresh
    tensors in the compute dtype); ``score(weights)`` returns the held-out metric of a state
    dict or of a zero-argument callable yielding pairs (``finetune.Evaluator.score``).
    """
    if count < 1:
        raise MergeError("a greedy soup needs at least one ingredient")
    label = list(names) if names is not None else [str(i) for i in range(count)]
    say = log or (lambda _msg: None)
    scores: list[float] = []
    for i in range(count):
        # A callable, so the evaluator streams the tensors straight into its model.
        s = float(score(lambda i=i: load(i)))
        scores.append(s)
        say(f"greedy soup: {label[i]} alone scores {s:.4f}")
    order = rank(scores, higher_is_better)
    first = order[0]
    soup: dict[str, torch.Tensor] = dict(load(first))
    best = scores[first]
    chosen = [first]
    steps: list[tuple[int, float, bool]] = []
    for i in order[1:]:
        n = len(chosen)
        candidate: dict[str, torch.Tensor] = {}
        for name, tensor in load(i):
            if name not in soup:
                raise MergeError(f"greedy soup: ingredient {label[i]} has tensor {name!r} the soup lacks")
            # The reference's update, in place on the fresh streamed tensor (no extra copy).
            candidate[name] = tensor.mul_(1 / (n + 1)).add_(soup[name], alpha=n / (n + 1))
        if candidate.keys() != soup.keys():
            missing = sorted(soup.keys() - candidate.keys())[:3]
            raise MergeError(f"greedy soup: ingredient {label[i]} lacks tensors {missing}")
        s = float(score(candidate))
        accepted = _better(s, best, higher_is_better)
        steps.append((i, s, accepted))
        say(f"greedy soup: + {label[i]} -> {s:.4f} ({'kept' if accepted else 'rejected'}; soup {best:.4f})")
        if accepted:
            soup, best = candidate, s
            chosen.append(i)
        del candidate  # the loser goes before the next candidate is built
    return GreedyResult(tuple(scores), tuple(order), tuple(steps), tuple(chosen), best)
