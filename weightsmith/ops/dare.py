"""DARE (Drop And REscale) task vectors, merged linearly (``dare_linear``) or with TIES's sign
consensus (``dare_ties``).

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024 (arXiv 2311.03099). Per tensor and model, each entry of the task vector
delta_i is dropped independently with probability 1 - density_i; survivors are rescaled, then
combined as mergekit's generalized task arithmetic (see ops/sparse/combine.py): dare_linear sums
weight_i * delta_i (``normalize`` divides by the weight sum), dare_ties adds TIES's sign
election and disjoint mean over agreeing models (``normalize`` divides by their weights).

``rescale`` (default true) with ``rescale_mode``:
* ``inverse_density`` (default, the paper): multiply survivors by 1/density, so the expected
  value of each entry is unchanged.
* ``l1`` (mergekit): multiply so the tensor's L1 norm equals the undropped one's; equal to the
  paper's only in expectation. Use it to reproduce mergekit's dare_* merges.

Randomness: the engine seeds one generator per tensor from ``--random-seed`` and the tensor
name; each model draws its uniforms from its own generator seeded from that one. The same seed
gives the same bytes whatever the threads or the memory budget; CPU and CUDA generators draw
different streams.
"""

from __future__ import annotations

from functools import partial

import torch

from weightsmith.ops.param_checks import check_choice, check_density
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, TensorSpec, register
from weightsmith.ops.sparse.combine import common_params
from weightsmith.ops.sparse.random_drop import random_drop_task_arithmetic
from weightsmith.ops.sparse.report import summarize
from weightsmith.ops.sparse.rescale import rescale_l1_
from weightsmith.ops.sparse.selection import drop_random_

RESCALE_MODES = ("inverse_density", "l1")


def _dare(
    inputs: MergeInputs,
    *,
    consensus: bool,
    weight: list[float],
    density: list[float],
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: str = "inverse_density",
    int8_mask: bool = False,
    **params: float,
) -> torch.Tensor:
    """dare_linear (``consensus=False``) and dare_ties (``consensus=True``)."""

    def drop_(i: int, delta: torch.Tensor, generator: torch.Generator | None) -> None:
        if density[i] >= 1:
            return
        l1 = delta.abs().sum() if rescale and rescale_mode == "l1" else None
        drop_random_(delta, density[i], generator)
        if l1 is not None:
            rescale_l1_(delta, l1)
        elif rescale:
            delta.div_(density[i])

    return random_drop_task_arithmetic(
        inputs,
        drop_,
        n_models=len(density),
        weight=weight,
        lam=params.get("lambda", 1.0),
        normalize=normalize,
        consensus=consensus,
    )


dare_linear = partial(_dare, consensus=False)
dare_ties = partial(_dare, consensus=True)


def _prepare(name: str):  # noqa: ANN202 - a small closure factory
    def prepare(specs: list[TensorSpec], dtype: torch.dtype) -> None:
        check_density(specs, name)
        check_choice(specs, "rescale_mode", RESCALE_MODES, name)

    return prepare


_PARAMS = (
    *common_params(normalize=False, rescale=True),
    Param("rescale_mode", "inverse_density", kind=str, doc="inverse_density (paper) | l1 (mergekit)"),
)

for _name, _fn, _summary in (
    ("dare_linear", dare_linear, "randomly drop task-vector entries, rescale, add (no sign election)"),
    ("dare_ties", dare_ties, "randomly drop task-vector entries, rescale, TIES sign election"),
):
    register(
        MergeMethod(
            name=_name,
            fn=_fn,
            params=_PARAMS,
            base="required",
            summary=_summary,
            paper="arXiv:2311.03099",
            # Random masks must not depend on how a tensor is split, and l1 needs whole tensors.
            elementwise=False,
            uses_randomness=True,
            prepare=_prepare(_name),
            summarize=summarize,
        )
    )
