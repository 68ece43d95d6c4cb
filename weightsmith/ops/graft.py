"""Skill grafting: a fine-tune's update kept only on a learned sparse region.

Panigrahi, Saunshi, Zhao, Arora, "Task-Specific Skill Localization in Fine-tuned Language
Models", ICML 2023 (reference code abhishekpanigrahi1996/Skill-Localization-by-grafting).

Applying a mask (``merge_method: graft``, ``parameters: {mask: FILE}``, one model)::

    theta = theta_pre + mask * (theta_ft - theta_pre)

``mask`` names a safetensors file with a tensor of the same name and shape for every floating
tensor of the model (``weightsmith graft`` writes bool tensors, zeros outside the graft region).
A missing tensor is an error rather than "keep the base": a mask for another model must not
silently give back the base.

The rest of this module is the math of finding the mask (the loop that feeds it gradients is
weightsmith.finetune.grafting): the global top-s start, the sigmoid parametrisation
gamma = b + (1 - 2b) sigmoid(S - c), its hand-written gradient and the rounding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from weightsmith.errors import MergeError
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register
from weightsmith.ops.selection import RadixSelect

SIGMOID_BIAS = 10.0  # the reference's default c


# --------------------------------------------------------------------------- applying a mask
def graft(inputs: MergeInputs, mask: str) -> torch.Tensor:
    assert inputs.base is not None
    m = inputs.aux.get("mask")
    if m is None:
        raise MergeError(
            f"tensor {inputs.name!r}: the graft mask {mask!r} has no tensor of that name. A graft "
            "mask holds one tensor per floating tensor of the model (zeros keep the base); make "
            "it with `weightsmith graft` for this model"
        )
    delta = inputs.models[0].sub_(inputs.base)  # in place: the models are the method's to reuse
    inputs.stats["numel"] = float(delta.numel())
    inputs.stats["grafted"] = float(torch.count_nonzero(m))
    return inputs.output_buffer().copy_(inputs.base).addcmul_(m, delta)


def summarize_graft(totals: dict[str, float], refs: list[str], context: object = None) -> dict:
    numel, kept = totals.get("numel", 0.0), totals.get("grafted", 0.0)
    frac = kept / numel if numel else 0.0
    return {
        "grafted_parameters": int(kept),
        "grafted_fraction": frac,
        "lines": [f"  grafted {int(kept):,} of {int(numel):,} parameters ({100 * frac:.4g}%)"],
    }


register(
    MergeMethod(
        name="graft",
        fn=graft,
        params=(
            Param("mask", kind=str, checkpoint=True, doc="safetensors file: per-tensor mask in [0, 1]"),
        ),
        base="required",
        summary="base + mask * (model - base): the fine-tune's update on the graft region only",
        paper="Panigrahi et al., ICML 2023: Task-Specific Skill Localization in Fine-tuned LMs",
        min_models=1,
        max_models=1,
        summarize=summarize_graft,
    )
)


# --------------------------------------------------------------------------- finding a mask
def top_fraction_mask(
    deltas: Mapping[str, torch.Tensor], sparsity: float
) -> dict[str, torch.Tensor]:
    """The base patch b: the k = round(sparsity * D) largest |delta| over ALL tensors at once.

    Global, as the reference (one threshold for the whole region). Entries with |delta| >= the
    k-th largest are kept (ties at the threshold kept, as everywhere in weightsmith; the reference
    keeps entries strictly above it, i.e. one fewer); zero deltas never are, because grafting
    them changes nothing and would only pad the count.
    """
    check_sparsity(sparsity)
    total = sum(d.numel() for d in deltas.values())
    k = max(1, round(sparsity * total))
    select = RadixSelect(torch.float32)
    while not select.done:
        counts = None
        for d in deltas.values():
            c = select.counts(d.float())
            counts = c if counts is None else counts + c
        select.absorb(counts, k if select.level == 0 else None)
    thr = select.value
    return {
        name: (d.abs() >= thr) & (d != 0) for name, d in deltas.items()
    }


def random_mask(
    shapes: Mapping[str, torch.Size], count: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Exactly ``count`` entries chosen uniformly over all tensors (the random-graft baseline)."""
    sizes = [int(torch.Size(s).numel()) for s in shapes.values()]
    total = sum(sizes)
    if not 0 <= count <= total:
        raise ValueError(f"cannot choose {count} of {total} entries")
    chosen = torch.randperm(total, generator=generator)[:count]
    flat = torch.zeros(total, dtype=torch.bool)
    flat[chosen] = True
    out, start = {}, 0
    for (name, shape), n in zip(shapes.items(), sizes):
        out[name] = flat[start : start + n].reshape(shape)
        start += n
    return out


def check_sparsity(sparsity: float) -> None:
    if not 0 < sparsity <= 1:
        raise MergeError(
            f"graft sparsity {sparsity}: it is the fraction of parameters grafted and must be in "
            "(0, 1] (the paper's headline graft is 1e-4)"
        )


def gamma(S: torch.Tensor, b: torch.Tensor, bias: float = SIGMOID_BIAS) -> torch.Tensor:
    """The relaxed mask gamma = b + (1 - 2b) sigmoid(S - c), in [0, 1].

    Entries of the base patch start near 1 (they can be switched off), the rest near 0 (they can
    be switched on): with S in [0, 1) and c = 10, sigmoid(S - c) is about 5e-5.
    """
    bf = b.to(S.dtype)
    return bf + (1 - 2 * bf) * torch.sigmoid(S - bias)


def score_gradient(
    grad_theta: torch.Tensor, delta: torch.Tensor, S: torch.Tensor, b: torch.Tensor,
    bias: float = SIGMOID_BIAS,
) -> torch.Tensor:
    """dL/dS = dL/dtheta * delta * (1 - 2b) * sigmoid'(S - c), by the chain rule through
    theta = theta_pre + gamma * delta (the reference's hand-written gradient)."""
    sig = torch.sigmoid(S - bias)
    return grad_theta * delta * (1 - 2 * b.to(S.dtype)) * sig * (1 - sig)


def rounded(S: torch.Tensor, b: torch.Tensor, bias: float = SIGMOID_BIAS) -> torch.Tensor:
    """The binary mask: gamma rounded to {0, 1} (gamma > 0.5; a base-patch entry stays on until
    sigmoid(S - c) exceeds 1/2)."""
    return gamma(S, b, bias) > 0.5


def apply_mask(
    pre: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """theta_pre + mask * delta, the grafted tensor (in memory; the streamed path is ``graft``)."""
    return pre + mask.to(pre.dtype) * delta
