"""Per-tensor band statistics: exact magnitude thresholds of the tensors the engine merges in
row blocks, found by streamed radix-selection passes (``GlobalStatistics``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from weightsmith.ops import fused, kernel_choice
from weightsmith.ops.registry import MergeInputs, TensorSpec
from weightsmith.ops.selection import RadixSelect
from weightsmith.ops.sparse.combine import task_vectors
from weightsmith.ops.sparse.selection import MagnitudeBand, TensorBands, _ranks, band_values
from weightsmith.ops.statistics import GlobalStatistics


class TensorBandStatistics(GlobalStatistics):
    """Exact per-tensor magnitude thresholds for the tensors the engine merges in row blocks.

    A per-tensor trim (TIES, breadcrumbs) needs the k-th largest |delta_i| of the whole tensor,
    so a tensor too big for the memory budget used to need one-off buffers for all of it (the
    vocab matrices of an LLM: gigabytes). Instead, streamed radix-selection passes over just
    those tensors' row blocks find the thresholds (two passes in float32), and the output pass
    then trims each row block with them: same numbers, memory within the budget.
    """

    count_aliases_once = False

    def __init__(
        self, bands: dict[str, list[MagnitudeBand]], rows: dict[str, int], dtype: torch.dtype
    ) -> None:
        self.bands = bands
        self.rows = rows
        self.dtype = dtype
        self.selectors = {
            name: {(i, k): RadixSelect(dtype) for i, b in enumerate(per_model) for k in _ranks(b)}
            for name, per_model in bands.items()
        }
        # Histograms of the tensors whose row blocks are still coming in this pass. A tensor's
        # histograms are resolved to 16 more bits as soon as its last block is counted, so at
        # most a tensor or two of histograms (0.5 MB per model and rank) are held at once,
        # however many tensors are split.
        self.pending: dict[str, tuple[int, list[torch.Tensor]]] = {}
        self.planned_passes = RadixSelect(dtype).levels
        self.purpose = f"per-tensor thresholds of {len(bands)} tensor(s) merged in row blocks"

    def visits(self, name: str) -> bool:
        return name in self.bands

    def wants_pass(self) -> bool:
        return any(not s.done for sel in self.selectors.values() for s in sel.values())

    def collect(self, inputs: MergeInputs, **params: Any) -> None:
        name = inputs.name
        selectors = self.selectors[name]
        if not selectors:
            return None
        assert inputs.base is not None
        rows = inputs.models.shape[1] if inputs.models.dim() > 1 else 1
        seen, total = self.pending.pop(name, (0, None))
        level = next(iter(selectors.values())).level
        kern = kernel_choice.for_statistics(inputs.models, inputs.kernels, fused)
        if kern is not None:
            # One accumulator per tensor, added into block after block (every block of a
            # tensor takes this path, whatever its size, so the counts stay in one place).
            delta = inputs.models  # the engine hands the slot over
            numel = self.rows[name] * (inputs.models[0].numel() // max(rows, 1))
            if level == 0:
                models = len(inputs.models)
                total = kern.new_histograms(models, numel) if total is None else total
                selected = {i for i, _ in selectors}
                kern.task_vectors_(delta, inputs.base, [i in selected for i in range(models)], None, total)
            else:
                total = kern.new_histograms(len(selectors), numel) if total is None else total
                kern.subtract_(delta, inputs.base)
                picks = [(i, sel.prefix) for (i, _), sel in selectors.items()]
                kern.refine_histograms(delta, picks, into=total)
        else:
            delta = task_vectors(inputs)
            counts = [sel.counts(delta[i]) for (i, _), sel in selectors.items()]
            total = counts if total is None else [a + b for a, b in zip(total, counts)]
        if seen + rows < self.rows[name]:
            self.pending[name] = (seen + rows, total)
            return None
        if isinstance(total, list):
            per_selector = total
        else:
            summed = kern.sum_histograms(total)  # the route every block took
            # level 0 counts per model (a model's histogram may serve two ranks), then per selector
            per_selector = [summed[i] for i, _ in selectors] if level == 0 else summed
        for ((_, k), sel), c in zip(selectors.items(), per_selector):
            sel.absorb(c, k if sel.level == 0 else None)
        return None

    def absorb(self, total: Any) -> None:
        if self.pending:  # every visited tensor's blocks add up to its rows
            raise RuntimeError(f"statistics pass ended with unfinished tensors: {sorted(self.pending)}")

    def result(self) -> TensorBands:
        return TensorBands(
            {
                name: [
                    band_values(b, lambda k, i=i, name=name: self.selectors[name][i, k].value)
                    for i, b in enumerate(per_model)
                ]
                for name, per_model in self.bands.items()
            }
        )


def band_from_statistics(params: dict[str, Any]) -> bool:
    """A per-tensor magnitude trim without rescale: its band values can come from statistics
    passes, so a tensor over the budget may be merged in row blocks (``splits_with_statistics``
    of ties and breadcrumbs; rescale needs the whole tensor's L1 norms)."""
    return params.get("scope", "tensor") == "tensor" and not params.get("rescale")


def split_tensor_statistics(
    specs: Sequence[TensorSpec], dtype: torch.dtype, bands: Callable[[TensorSpec], list[MagnitudeBand]]
) -> TensorBandStatistics | None:
    """Statistics for the tensors the engine splits (``TensorSpec.split``), or None."""
    split = {spec.name: bands(spec) for spec in specs if spec.split}
    rows = {spec.name: spec.shape[0] for spec in specs if spec.split}
    return TensorBandStatistics(split, rows, dtype) if split else None

