"""The per-model loop of the random-drop methods (DARE, DELLA): each model's task vector is
dropped with its own generator, then the family's combine runs.

Model i draws from a generator seeded from the tensor's (``model_generators``), so its mask is
a function of the seed, the tensor name and i alone; how an entry is dropped and rescaled is
the method's ``drop_``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from weightsmith.ops.registry import MergeInputs
from weightsmith.ops.sparse.combine import generalized_task_arithmetic
from weightsmith.ops.sparse.selection import model_generators

# drop_(i, delta_i, generator_i): model i's task vector, dropped (and rescaled) in place.
DropOne = Callable[[int, torch.Tensor, torch.Generator | None], None]


def random_drop_task_arithmetic(
    inputs: MergeInputs,
    drop_: DropOne,
    *,
    n_models: int,
    weight: list[float],
    lam: float,
    normalize: bool,
    consensus: bool,
) -> torch.Tensor:
    """``generalized_task_arithmetic`` with model i's task vector sparsified by ``drop_`` drawing
    from model i's own generator."""
    generators = model_generators(inputs, n_models)

    def sparsify(i: int, delta: torch.Tensor) -> None:
        drop_(i, delta, generators[i])

    return generalized_task_arithmetic(
        inputs, sparsify, weight=weight, lam=lam, normalize=normalize, consensus=consensus
    )
