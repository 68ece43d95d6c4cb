"""BANG, data-free variant: WiSE-FT with the fine-tune's classifier head scaled down first.

Lin et al., "Spurious Feature Diversification Improves Out-of-distribution Generalization",
ICLR 2024 (arXiv 2309.17230). BANG ("BAlaNced averaGing") is WiSE-FT between the zero-shot
(base) model and a fine-tune made less over-confident, so the two contribute evenly. The paper's
main recipe calibrates the fine-tune at training time (label smoothing and/or MixUp; see
``weightsmith bang``, which then averages with ``wise_ft``). This operator is the data-free
approximation it discusses: divide the fine-tune's output layer by ``temperature`` (c >= 1; a
linear head scaled by 1/c scales its logits by 1/c), then

    theta = (1 - alpha) * theta_0 + alpha * theta_ft'   (theta_ft' = theta_ft with head / c)

``temperature: 1`` is ``wise_ft`` bit for bit. Uncertain (algorithms.md §6, §12 item 3): no
reference code exists for this part, and whether the paper scales weights or logits, and by how
much, could not be checked; treat ``temperature`` as a knob to tune on held-out data.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from weightsmith.errors import RecipeError
from weightsmith.ops.param_checks import check_uniform
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, TensorSpec, register

# The last layer of common sequence-classification heads (BERT/RoBERTa/Llama-style) and LM heads.
DEFAULT_HEAD = r"^(?:.*\.)?(?:classifier|score|lm_head|classifier\.out_proj)\.(?:weight|bias)$"


def bang(
    inputs: MergeInputs, alpha: float = 0.5, temperature: float = 1.0, head: str = DEFAULT_HEAD
) -> torch.Tensor:
    assert inputs.base is not None
    ft = inputs.models[0]
    if temperature != 1 and re.search(head, inputs.name):
        ft = ft.div_(temperature)
        inputs.stats["head_tensors_scaled"] = 1.0
    # The same expression as wise_ft, so temperature 1 reproduces it exactly.
    return (1 - alpha) * inputs.base + alpha * ft


def prepare(specs: list[TensorSpec], dtype: torch.dtype) -> None:
    pattern = check_uniform(specs, "head", "it names the head tensors")
    try:
        regex = re.compile(pattern or "")
    except re.error as e:
        raise RecipeError(f"parameters.head: {pattern!r} is not a valid regular expression ({e})") from None
    scaled = False
    for spec in specs:
        c = spec.params["temperature"]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (c > 0 and math.isfinite(c)):
            raise RecipeError(f"bang: temperature for tensor {spec.name!r} is {c!r}; it must be > 0")
        scaled |= c != 1 and bool(regex.search(spec.name))
    if specs and not scaled and any(s.params["temperature"] != 1 for s in specs):
        raise RecipeError(
            f"bang: temperature is set but no tensor matches the head pattern {pattern!r}; set "
            "parameters.head to a regex of the output layer's tensors (e.g. 'classifier\\.')"
        )
    return None


def summarize(totals: dict[str, float], refs: list[str], context: Any = None) -> dict[str, Any]:
    n = int(totals.get("head_tensors_scaled", 0))
    return {
        "head_tensors_scaled": n,
        "lines": [f"  bang: fine-tune's head divided by the temperature in {n} tensor(s) before averaging"],
    }


register(
    MergeMethod(
        name="bang",
        fn=bang,
        params=(
            Param("alpha", 0.5, doc="0 = base, 1 = (scaled) fine-tune"),
            Param("temperature", 1.0, doc="divide the fine-tune's head by this (>= 1 calibrates)"),
            Param("head", DEFAULT_HEAD, kind=str, doc="regex of the head tensors to scale"),
        ),
        base="required",
        summary="WiSE-FT with the fine-tune's head scaled by 1/temperature (BANG, data-free)",
        paper="arXiv:2309.17230",
        min_models=1,
        max_models=1,
        prepare=prepare,
        summarize=summarize,
    )
)
