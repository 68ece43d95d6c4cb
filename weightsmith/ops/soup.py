"""Model soups: average fine-tunes of one pre-trained model (uniform or greedy).

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022 (arXiv 2203.05482).

``mode: uniform`` (default) is the equal-weight average of every model listed, computed with
``linear``'s arithmetic (so it equals ``linear`` with equal weights bit for bit).

``mode: greedy`` chooses the ingredients on held-out data first (``weightsmith/greedy_soup.py``:
sort by held-out score, add each if the soup's score strictly improves), then this operator
writes the uniform average of the chosen ones. The choice needs the recipe's ``evaluation:``
block and runs models, so it happens in ``weightsmith merge`` / ``merge()`` before the streamed
output pass; the operator only checks that it did (a greedy soup merged without the selection
would silently average every candidate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from weightsmith.errors import MergeError
from weightsmith.ops.linear import linear
from weightsmith.ops.param_checks import check_choice, check_uniform
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, TensorSpec, register

MODES = ("uniform", "greedy")


@dataclass(frozen=True)
class GreedySelection:
    """What the held-out selection decided; the output pass averages ``chosen``.

    ``ingredients`` holds one row per candidate in recipe order (``model``, ``score``,
    ``rank``); ``steps`` one row per candidate tried after the first (``model``,
    ``candidate_score``, ``accepted``, ``soup_size`` after the step).
    """

    metric: str
    higher_is_better: bool
    evaluation: dict[str, Any]
    ingredients: tuple[dict[str, Any], ...]
    steps: tuple[dict[str, Any], ...]
    chosen: tuple[str, ...]
    score: float  # held-out score of the final soup
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def soup(inputs: MergeInputs, mode: str = "uniform") -> torch.Tensor:
    if mode == "greedy" and not isinstance(inputs.context, GreedySelection):
        raise MergeError(
            f"tensor {inputs.name!r}: a greedy soup chooses its ingredients on held-out data "
            "first; run it through weightsmith merge / merge() with an `evaluation:` block"
        )
    n = inputs.models.shape[0]
    inputs.stats["parameters"] = float(inputs.models[0].numel())
    return linear(inputs, weight=[1.0] * n, normalize=True)


def prepare(specs: list[TensorSpec], dtype: torch.dtype) -> None:
    check_choice(specs, "mode", MODES, "soup")
    check_uniform(specs, "mode", "one mode for the whole soup")
    return None


def summarize(totals: dict[str, float], refs: list[str], context: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"mode": "uniform", "ingredients": list(refs)}
    lines = [f"  uniform soup of {len(refs)} ingredient(s)"]
    if isinstance(context, GreedySelection):
        better = "higher" if context.higher_is_better else "lower"
        out = {
            "mode": "greedy",
            "metric": context.metric,
            "higher_is_better": context.higher_is_better,
            "evaluation": context.evaluation,
            "ingredients": list(context.ingredients),
            "steps": list(context.steps),
            "chosen": list(context.chosen),
            "soup_score": context.score,
            "selection_seconds": round(context.seconds, 3),
            **context.extra,
        }
        lines = [f"  greedy soup: {len(context.chosen)} of {len(context.ingredients)} ingredients "
                 f"kept; held-out {context.metric} {context.score:.4f} ({better} is better)"]
        for row in sorted(context.ingredients, key=lambda r: r["rank"]):
            kept = "kept" if row["model"] in context.chosen else "rejected"
            lines.append(f"    {row['rank'] + 1}. {row['model']}: alone {row['score']:.4f} ({kept})")
    out["lines"] = lines
    return out


register(
    MergeMethod(
        name="soup",
        fn=soup,
        params=(
            Param("mode", "uniform", kind=str, doc="uniform | greedy (needs `evaluation:`)"),
        ),
        base="unused",
        summary="model soup: uniform average, or greedy on held-out data (`evaluation:`)",
        paper="arXiv:2203.05482",
        prepare=prepare,
        summarize=summarize,
    )
)
