"""DELLA: magnitude-ranked random drop of task-vector entries, rescaled, merged with TIES's sign
consensus (``della``) or linearly (``della_linear``).

Deep, Bhardwaj & Poria, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", 2024 (arXiv 2406.11617); mergekit's ``della`` / ``della_linear``
(sparsifier ``della_magprune``) define the recipe surface followed here.

Per tensor and model i with density d < 1 and ``epsilon`` e, within each row (the entries along
dim 1, as mergekit ranks them: the rows of a matrix; a 1-D tensor is one row) of length n:
entries are ranked by |delta| ascending, r = 0 .. n-1, and entry r is kept with probability
p_r = (d - e) + 2 e r / (n - 1), so bigger magnitudes survive more often and the mean keep
probability is d (a one-element row keeps with probability d). Requires 0 < d - e and
d + e < 1, as mergekit. ``rescale`` (default true) with ``rescale_mode``:

* ``inverse_probability`` (default, the paper): each survivor is divided by its own p_r, so every
  entry keeps its expected value.
* ``l1`` (mergekit): the surviving task vector is scaled so its L1 norm equals the undropped
  one's. Use it to reproduce mergekit's della merges in distribution.

Then mergekit's generalized task arithmetic (ops/sparsify.py): D_i = weight_i * delta_i; della
elects a sign per coordinate and averages the agreeing D_i (``normalize`` default true);
della_linear sums them (``normalize`` default false); theta = theta_0 + lambda * merged.
density 1 leaves a task vector whole (della is then ties at density 1, della_linear task
arithmetic). Magnitudes tied within a row are ranked by position (a stable sort), where mergekit
ranks them in its sort's arbitrary order.

Randomness: as DARE (ops/dare.py): one generator per tensor from ``--random-seed`` and the
tensor name, one generator per model seeded from it, uniforms drawn row chunk by row chunk in
row-major order. With ``epsilon: 0`` every p is d and della_linear / della give the same bytes
as dare_linear / dare_ties with the same seed (tested). mergekit draws its Bernoulli masks from
torch's global generator, so single merges agree with mergekit only in distribution.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from weightsmith.errors import RecipeError
from weightsmith.ops.param_checks import check_choice, check_density
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, TensorSpec, register
from weightsmith.ops.row_ranks import ranks_along_dim1
from weightsmith.ops.sparse.combine import common_params
from weightsmith.ops.sparse.random_drop import random_drop_task_arithmetic
from weightsmith.ops.sparse.report import summarize
from weightsmith.ops.sparse.rescale import rescale_l1_

RESCALE_MODES = ("inverse_probability", "l1")
CHUNK = 1 << 20  # elements per row chunk: bounds the int64 rank scratch


def keep_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p for every entry of ``magnitudes`` (at least 2-D): ranked along dim 1, ascending.

    p = (d - e) + (r / (n - 1)) * 2 * e in float32, with r the 0-based rank of |x| in its row
    (ties by position). The operation order is mergekit's, so equal ranks give equal p.
    """
    n = magnitudes.shape[1]
    if n == 1:
        return torch.full(magnitudes.shape, density, dtype=torch.float32, device=magnitudes.device)
    # Linear-time radix ranks on CPU float32 (numba), torch's stable sort elsewhere: same ranks.
    rank_norm = ranks_along_dim1(magnitudes).div_(n - 1)
    return rank_norm.mul_(2).mul_(epsilon).add_(density - epsilon)


def della_drop_(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator | None,
    rescale: bool,
    rescale_mode: str,
) -> None:
    """Drop entries of one task vector in place with DELLA's ranked probabilities; rescale."""
    if density >= 1 or delta.numel() == 0:
        return
    l1 = delta.abs().sum() if rescale and rescale_mode == "l1" else None
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    step = max(1, CHUNK // max(rows[0].numel(), 1))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        p = keep_probabilities(block.abs(), density, epsilon)
        u = torch.rand(block.shape, generator=generator, dtype=torch.float32, device=block.device)
        block.mul_(u < p)
        if rescale and rescale_mode == "inverse_probability":
            block.div_(p)  # dropped entries are 0 and stay 0
    if l1 is not None:
        rescale_l1_(delta, l1)


def _della(
    inputs: MergeInputs,
    *,
    consensus: bool,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    normalize: bool,
    rescale: bool = True,
    rescale_mode: str = "inverse_probability",
    int8_mask: bool = False,
    **params: float,
) -> torch.Tensor:
    """della (``consensus=True``) and della_linear (``consensus=False``)."""

    def drop_(i: int, delta: torch.Tensor, generator: torch.Generator | None) -> None:
        della_drop_(delta, density[i], epsilon[i], generator, rescale, rescale_mode)

    return random_drop_task_arithmetic(
        inputs,
        drop_,
        n_models=len(density),
        weight=weight,
        lam=params.get("lambda", 1.0),
        normalize=normalize,
        consensus=consensus,
    )


della = partial(_della, consensus=True)
della_linear = partial(_della, consensus=False)


def check_epsilon(specs: list[TensorSpec], method: str) -> None:
    """mergekit's rule: where a task vector is dropped (density < 1), d - e > 0 and d + e < 1."""
    for spec in specs:
        for i, (d, e) in enumerate(zip(spec.params["density"], spec.params["epsilon"])):
            if d < 1 and (not d - e > 0 or not d + e < 1 or math.isnan(e)):
                raise RecipeError(
                    f"{method}: {spec.model_label(i)}, tensor {spec.name!r}: density {d} and "
                    f"epsilon {e} give "
                    f"keep probabilities from {d - e:g} to {d + e:g}; choose epsilon so that "
                    "density - epsilon > 0 and density + epsilon < 1"
                )


def _prepare(name: str):  # noqa: ANN202 - a small closure factory
    def prepare(specs: list[TensorSpec], dtype: torch.dtype) -> None:
        check_density(specs, name)
        check_epsilon(specs, name)
        check_choice(specs, "rescale_mode", RESCALE_MODES, name)

    return prepare


def _params(normalize: bool) -> tuple[Param, ...]:
    return (
        *common_params(normalize=normalize, rescale=True),
        Param("epsilon", 0.15, per_model=True, doc="keep probabilities span density +- epsilon by rank"),
        Param(
            "rescale_mode",
            "inverse_probability",
            kind=str,
            doc="inverse_probability (paper: divide by p) | l1 (mergekit)",
        ),
    )


for _name, _fn, _normalize, _summary in (
    ("della", della, True, "magnitude-ranked random drop, rescale, TIES sign election"),
    ("della_linear", della_linear, False, "magnitude-ranked random drop, rescale, add (no sign election)"),
):
    register(
        MergeMethod(
            name=_name,
            fn=_fn,
            params=_params(_normalize),
            base="required",
            summary=_summary,
            paper="arXiv:2406.11617",
            # Random masks must not depend on how a tensor is split, and l1 needs whole tensors.
            elementwise=False,
            uses_randomness=True,
            prepare=_prepare(_name),
            summarize=summarize,
        )
    )
