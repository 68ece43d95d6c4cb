"""Merge methods by name, with their parameter schemas.

A method is a pure function over stacked float tensors: it never opens files, never picks a
device, and never knows how the engine batched its inputs. The engine never knows its math.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from weightsmith.notices import did_you_mean

REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    """One recipe parameter of a method.

    ``per_model`` parameters are resolved for each input model (e.g. ``weight``); the others
    are shared by the whole merge (e.g. ``lambda``). Either kind may vary per tensor through
    filters and per layer through gradients.
    """

    name: str
    default: Any = REQUIRED
    per_model: bool = False
    kind: type = float
    doc: str = ""
    # The value names a checkpoint (folder, .safetensors file or Hub id). The engine opens it
    # and hands the method the same-named tensor as ``inputs.aux[name]`` (a list over models
    # for per-model parameters), so methods that need more than the base and the models
    # (fine-tuning transfer's source bases, grafting's mask) still never open files.
    checkpoint: bool = False
    # Accepted so mergekit recipes run unchanged, but without effect here (task_arithmetic's
    # density, int8_mask): `weightsmith plan` does not show it.
    ignored: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass
class MergeInputs:
    """What a method sees for one output tensor (or one block of its rows).

    ``models`` stacks the non-base inputs along dim 0 in recipe order, in the compute dtype
    (float32 unless the recipe asks for float64). ``stats`` is where a method may leave
    numbers about this tensor for ``merge_report.json``.

    The engine hands over ``models`` and ``base`` for good: a method may overwrite them in
    place (and should, where it saves a full-size temporary). ``out``, when given, is a
    reusable buffer of the output's shape and dtype that a method may compute into and
    return; see ``output_buffer``.
    """

    name: str
    models: torch.Tensor
    base: torch.Tensor | None = None
    generator: torch.Generator | None = None
    context: Any = None
    stats: dict[str, float] = field(default_factory=dict)
    out: torch.Tensor | None = None
    # Tensors of checkpoint-valued parameters (see ``Param.checkpoint``), in the compute dtype;
    # None where that checkpoint has no such tensor.
    aux: dict[str, Any] = field(default_factory=dict)
    # The models' references in the order of ``models``, for messages (may be empty).
    model_refs: tuple[str, ...] = ()
    # Kernels for tensors on a device (``--kernels``: "torch" or "cupy"; "auto" outside the
    # engine); the operator picks per tensor with ``ops.kernel_choice.pick``.
    kernels: str = "auto"

    def output_buffer(self) -> torch.Tensor:
        """The engine's reusable output buffer, or a fresh one (uninitialized)."""
        if self.out is not None:
            return self.out
        return torch.empty_like(self.models[0])


@dataclass(frozen=True)
class TensorSpec:
    """One merged tensor as ``MergeMethod.prepare`` sees it at plan time (no data)."""

    name: str
    shape: tuple[int, ...]
    params: dict[str, Any]
    # The engine merges this tensor in row blocks although the method is not elementwise for
    # it: ``prepare`` must return statistics that give the method this tensor's numbers (see
    # ``MergeMethod.splits_with_statistics``).
    split: bool = False
    # The input models' references in recipe order (the base excluded), so a method's messages
    # name the model, not its position: see ``model_label``.
    models: tuple[str, ...] = ()

    def model_label(self, i: int) -> str:
        return f"model {self.models[i]!r}" if i < len(self.models) else f"model {i}"


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    base: Literal["required", "optional", "unused"]
    summary: str
    paper: str = ""
    min_models: int = 1
    max_models: int | None = None
    # True when output element i depends only on input elements i, so the engine may split
    # a huge tensor into row blocks. Methods with per-tensor statistics or randomness say False.
    # It may also be a function of a tensor's resolved parameters (ties splits only with
    # scope: model, where the model-wide statistics are known before the output pass).
    elementwise: bool | Callable[[dict[str, Any]], bool] = True
    # A method that is not elementwise only because of per-tensor statistics (TIES' per-tensor
    # threshold) may still take a tensor too big for the budget in row blocks: the engine then
    # marks it ``TensorSpec.split``, and ``prepare``'s statistics compute those numbers in
    # streamed passes over just these tensors. Same shape as ``elementwise``.
    splits_with_statistics: bool | Callable[[dict[str, Any]], bool] = False
    # Working memory the method needs whatever the tensor size (TIES' selection histograms), as
    # a function of the number of models; the engine takes it off the budget before sizing
    # its buffers.
    fixed_scratch: Callable[[int], int] | None = None
    # Temporary bytes per element of a unit the method needs besides the engine's slot, from
    # (number of models, compute dtype); None (or a None result) means about one more stacked
    # copy, the engine's default. Methods that work in place say 0 and get bigger units.
    scratch_per_element: Callable[[int, torch.dtype], int | None] | None = None
    uses_randomness: bool = False
    # Its arithmetic (an SVD, O(n^3)) dwarfs zero-filling fresh pages (O(n^2)), so the engine
    # serves its big temporaries from fresh mmaps that leave RSS when freed. On glibc's heap,
    # LAPACK's workspaces of many sizes fragment it: iso_cts's peak on 1024 x 1024 float32
    # varied from 9 to 20 copies of the matrix with the heap's start-up layout, 9.7 when mapped.
    compute_bound: bool = False
    # A wider arithmetic dtype the method's reference uses (fine-tuning transfer: float64).
    compute_dtype: torch.dtype | None = None
    # The dtype of the method's result, from the compute dtype, where it is not the compute
    # dtype; written when the recipe sets no out_dtype (mergekit's arcee_fusion mixes in a
    # float32 mask, so its bf16 merge returns and writes float32).
    result_dtype: Callable[[torch.dtype], torch.dtype] | None = None
    # Called at plan time with every merged tensor and the compute dtype. It raises RecipeError
    # for bad parameters (so errors come before any work), and returns None or a
    # ``weightsmith.ops.statistics.GlobalStatistics``: model-wide statistics that the engine fills
    # by streamed passes over the inputs before the output pass, then hands to ``fn`` as
    # ``inputs.context``. The engine calls it again for a fresh state at each execution.
    prepare: Callable[[list[TensorSpec], torch.dtype], Any] | None = None
    # Turns the totals of the per-tensor ``stats`` (summed over tensors), the model refs in
    # recipe order and the global statistics' result into merge_report.json's ``summary``;
    # its ``lines`` (if any) are what ``weightsmith merge`` prints.
    summarize: Callable[[dict[str, float], list[str], Any], dict[str, Any]] | None = None
    # Other numerics of the same method (``numerics: mergekit``: mergekit 0.1.5's arithmetic):
    # mode -> the method as that mode runs it. Filled by ``register_numerics``.
    numerics: dict[str, MergeMethod] = field(default_factory=dict)

    def for_numerics(self, mode: str) -> MergeMethod:
        """This method as ``numerics: mode`` runs it. A method without its own variant for the
        mode runs unchanged, in the mode's compute dtype (the engine passes that dtype)."""
        return self.numerics.get(mode, self)

    def splittable(self, params: dict[str, Any]) -> bool:
        """Whether a tensor with these resolved parameters may be merged in row blocks alone."""
        return self.elementwise(params) if callable(self.elementwise) else self.elementwise

    def splittable_with_statistics(self, params: dict[str, Any]) -> bool:
        """Whether it may be merged in row blocks given per-tensor statistics passes."""
        flag = self.splits_with_statistics
        return flag(params) if callable(flag) else flag

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def __call__(self, inputs: MergeInputs, **params: Any) -> torch.Tensor:
        return self.fn(inputs, **params)


# Filled as the modules of ``weightsmith.ops`` are imported; importing this module imports that
# package first (Python imports a package before its modules), which imports every method.
_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def register_numerics(name: str, mode: str, fn: Callable[..., torch.Tensor], **changes: Any) -> MergeMethod:
    """Register ``fn`` as method ``name``'s function under ``numerics: mode``. ``changes``
    replace other fields for that mode (a variant that needs whole tensors says
    ``elementwise=False, splits_with_statistics=False, prepare=None``)."""
    method = get_method(name)
    if mode in method.numerics:
        raise ValueError(f"merge method {name!r} has numerics {mode!r} registered twice")
    variant = replace(method, fn=fn, numerics={}, **changes)
    _REGISTRY[name] = replace(method, numerics={**method.numerics, mode: variant})
    return variant


def get_method(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        hint = did_you_mean(str(name), _REGISTRY)
        raise KeyError(f"unknown merge_method {name!r}{hint or ';'} known methods: {known}") from None


def methods() -> dict[str, MergeMethod]:
    return dict(sorted(_REGISTRY.items()))


def per_model_column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-model scalars shaped to broadcast against a stack of shape [N, *tensor_shape]."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))
