"""Shared core of the sparse task-vector family (TIES, DARE, breadcrumbs): sparsifiers, the
sign-consensus combine, per-tensor report statistics, and the report summary.

This is mergekit's "generalized task arithmetic", restated: for each model i the task vector
delta_i = theta_i - theta_0 is sparsified (magnitude top-k, random drop, or a magnitude band),
optionally rescaled, weighted (D_i = w_i * delta_i), then combined:

* with consensus (TIES): elected sign s = +1 where sum_i D_i >= 0 else -1; model i takes part
  at a coordinate iff sign(D_i) == s (zeros never do); merged = sum_i D_i [agree] divided by
  sum_i w_i [agree] when ``normalize`` (a 0 divisor counts as 1);
* without: merged = sum_i D_i, divided by sum_i w_i when ``normalize`` (|sum| < 1e-8 -> 1);

and theta = theta_0 + lambda * merged. Every function here works on one tensor in memory.

Selection keeps every element whose magnitude equals a kept one ("ties at the threshold are
kept"): the kept set is mergekit's exactly-k set plus the elements tied with its smallest
member, so it never depends on sort order (see docs/methods/sparse.md for how much differs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.errors import NonFiniteInput, RecipeError
from weightsmith.ops import fused
from weightsmith.ops.registry import MergeInputs, Param, TensorSpec
from weightsmith.ops.selection import RadixSelect, kth_largest_abs, kth_largest_abs_rows
from weightsmith.ops.statistics import GlobalStatistics

L1_EPS = 1e-7  # below this an L1 norm counts as zero and rescaling is skipped (as mergekit)


# --------------------------------------------------------------------------- parameters
def common_params(*, normalize: bool, rescale: bool) -> tuple[Param, ...]:
    """Parameters every generalized-task-arithmetic method shares (mergekit's names)."""
    return (
        Param("weight", 1.0, per_model=True, doc="task vector coefficient (mergekit requires it)"),
        Param("density", 1.0, per_model=True, doc="fraction of the task vector kept, in (0, 1]"),
        Param("lambda", 1.0, doc="scale of the merged task vector"),
        Param("normalize", normalize, kind=bool, doc="divide by the sum of (agreeing) weights"),
        Param("rescale", rescale, kind=bool, doc="rescale what survives sparsification"),
        Param("int8_mask", False, kind=bool, doc="accepted for mergekit recipes; no effect here"),
    )


def check_density(specs: Sequence[TensorSpec], method: str) -> None:
    for spec in specs:
        for i, d in enumerate(spec.params["density"]):
            if not (0 < d <= 1) or math.isnan(d):
                raise RecipeError(
                    f"{method}: density of model {i} for tensor {spec.name!r} is {d}; it is the "
                    "fraction of each task vector kept and must be in (0, 1]"
                )


def check_choice(specs: Sequence[TensorSpec], name: str, options: tuple[str, ...], method: str) -> None:
    for spec in specs:
        value = spec.params[name]
        if value not in options:
            raise RecipeError(
                f"parameters.{name}: `{method}` takes {' | '.join(options)}, got {value!r} "
                f"(tensor {spec.name!r})"
            )


def check_uniform(specs: Sequence[TensorSpec], name: str, why: str) -> Any:
    """The value of a parameter that must not vary by tensor (no filters or gradients)."""
    values = {repr(s.params[name]) for s in specs}
    if len(values) > 1:
        raise RecipeError(
            f"parameters.{name}: must be the same for every tensor ({why}); "
            f"filters or gradients give {len(values)} different values: {', '.join(sorted(values))}"
        )
    return specs[0].params[name] if specs else None


# --------------------------------------------------------------------------- sparsifiers
def magnitude_count(density: float, n: int) -> int:
    """mergekit's k for magnitude pruning: floor(density * n), at least one element."""
    return max(1, int(density * n))


@dataclass(frozen=True)
class MagnitudeBand:
    """Which entries of one task vector survive a magnitude trim, as selection ranks.

    Kept: |x| >= the ``lo``-th largest |x| (None: no lower bound) and |x| <= the ``hi``-th
    largest (None: no upper bound); ``empty`` keeps nothing. Ranks, not values, so the torch
    path and the fused kernels (ops/fused.py) select the same entries from one definition.
    """

    lo: int | None = None
    hi: int | None = None
    empty: bool = False

    @property
    def trims(self) -> bool:
        return self.empty or self.lo is not None or self.hi is not None


def magnitude_band(density: float, n: int) -> MagnitudeBand:
    """TIES' trim: keep |x| >= the k-th largest |x|, k = max(1, floor(density n))."""
    if density >= 1 or n == 0:
        return MagnitudeBand()
    return MagnitudeBand(lo=magnitude_count(density, n))


def breadcrumbs_band(density: float, gamma: float, n: int) -> MagnitudeBand:
    """Breadcrumbs per tensor (mergekit's magnitude_outliers).

    mergekit sorts |x| ascending and keeps positions [n_bot, n_bot + n_keep) with
    n_keep = floor(density n), n_top = floor(gamma n), n_bot = max(0, n - n_keep - n_top), i.e.
    it drops the n_top largest (fewer when density + gamma > 1) and the smallest. Here the kept
    band is by value: lo <= |x| <= hi, lo and hi being the smallest and largest magnitudes that
    exact selection keeps, so tied magnitudes share one fate.
    """
    if density >= 1 or n == 0:
        return MagnitudeBand()
    n_keep = int(density * n)
    if n_keep == 0:
        return MagnitudeBand(empty=True)
    n_bot = max(0, n - n_keep - int(gamma * n))
    # ascending positions n_bot (lo) and n_bot + n_keep - 1 (hi), as k-th largest ranks
    return MagnitudeBand(lo=n - n_bot, hi=n - (n_bot + n_keep - 1))


def trim_magnitude_(delta: torch.Tensor, density: float) -> None:
    """Zero all but the largest-|x| entries, in place: keep |x| >= the k-th largest |x|."""
    band = magnitude_band(density, delta.numel())
    if band.lo is None:
        return
    mag = delta.abs()
    thr = kth_largest_abs(mag, band.lo, magnitudes=True)
    # Multiplying by the boolean keep-mask is ~1.5x faster than masked_fill_ on the CPU, and
    # exact: x * 1 = x, x * 0 = +-0 (a signed zero is still zero to every later step).
    delta.mul_(mag >= thr)


def trim_band_(delta: torch.Tensor, density: float, gamma: float) -> None:
    """Breadcrumbs per tensor, in place (see ``breadcrumbs_band``)."""
    band = breadcrumbs_band(density, gamma, delta.numel())
    if band.empty:
        delta.zero_()
        return
    if not band.trims:
        return
    assert band.lo is not None and band.hi is not None
    mag = delta.abs()
    hi = kth_largest_abs(mag, band.hi)
    lo = kth_largest_abs(mag, band.lo)
    delta.masked_fill_((mag < lo) | (mag > hi), 0)


def trim_band_rows_(delta: torch.Tensor, density: float, gamma: float) -> None:
    """Breadcrumbs per row, as the paper's code (TaskVectorMiddleKeep), in place.

    For each row r along the last dimension (length d; a 1-D tensor is one row; scalars are
    kept): remove the floor(gamma d) largest |x|, then keep the next floor(density d). By value:
    keep hi_r >= |x| >= lo_r, with hi_r the (floor(gamma d) + 1)-th largest and lo_r the
    min(d, floor(gamma d) + floor(density d))-th largest |x| of the row.
    """
    if delta.dim() == 0 or (density >= 1 and gamma <= 0):
        return
    d = delta.shape[-1]
    n_top = int(gamma * d)
    n_keep = int(density * d)
    if n_keep == 0 or n_top >= d:
        delta.zero_()
        return
    mag = delta.abs()
    hi = kth_largest_abs_rows(delta, n_top + 1)
    lo = kth_largest_abs_rows(delta, min(d, n_top + n_keep))
    delta.masked_fill_((mag < lo) | (mag > hi), 0)


def drop_random_(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> None:
    """DARE's drop: zero each entry independently with probability 1 - density, in place.

    Uniforms come from ``generator`` only, so the mask is a function of the seed and the tensor
    name alone (the engine never splits random methods into row blocks).
    """
    if density >= 1:
        return
    u = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=delta.device)
    delta.masked_fill_(u >= density, 0)


def rescale_l1_(delta: torch.Tensor, l1_before: torch.Tensor) -> None:
    """mergekit's rescale: multiply so the L1 norm equals the unpruned one (if both are > 1e-7)."""
    after = delta.abs().sum()
    if l1_before >= L1_EPS and after >= L1_EPS:
        delta.mul_(l1_before / after)


def model_generators(inputs: MergeInputs, n: int) -> list[torch.Generator | None]:
    """One generator per model, seeded from the tensor's generator.

    So model i's mask depends on the seed, the tensor name and i, not on the other models'
    densities (a model at density 1 draws nothing).
    """
    if inputs.generator is None:
        return [None] * n
    seeds = torch.randint(0, 2**62, (n,), generator=inputs.generator, device=inputs.generator.device)
    out: list[torch.Generator | None] = []
    for s in seeds.tolist():
        g = torch.Generator(device=inputs.generator.device)
        g.manual_seed(int(s))
        out.append(g)
    return out


def _ranks(band: MagnitudeBand) -> list[int]:
    return [r for r in (band.lo, band.hi) if r is not None]


def band_values(band: MagnitudeBand, value: Callable[[int], float]) -> tuple[float, float]:
    """(lo, hi) magnitudes of a band, given the k-th largest |x| for its ranks."""
    if band.empty:
        return (math.inf, math.inf)  # |x| < inf for every finite x: nothing kept
    lo = value(band.lo) if band.lo is not None else 0.0
    hi = value(band.hi) if band.hi is not None else math.inf
    return (lo, hi)


class TensorBands(dict):
    """Per-tensor band values found by ``TensorBandStatistics``: name -> [(lo, hi)] per model."""


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
        on_kernels = fused.available() and inputs.models.dtype == torch.float32
        if on_kernels and inputs.models.device.type == "cpu":
            # One per-thread accumulator per tensor, added into block after block (every block
            # of a tensor takes this path, whatever its size, so the counts stay in one place).
            delta = inputs.models  # the engine hands the slot over
            numel = self.rows[name] * (inputs.models[0].numel() // max(rows, 1))
            if level == 0:
                models = len(inputs.models)
                total = fused.new_histograms(models, numel) if total is None else total
                selected = {i for i, _ in selectors}
                fused.task_vectors_(delta, inputs.base, [i in selected for i in range(models)], None, total)
            else:
                total = fused.new_histograms(len(selectors), numel) if total is None else total
                fused.subtract_(delta, inputs.base)
                picks = [(i, sel.prefix) for (i, _), sel in selectors.items()]
                fused.refine_histograms(delta, picks, into=total)
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
            summed = fused.sum_histograms(total)
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


def check_finite(stats: dict[str, float], name: str) -> None:
    """Raise if an input held NaN/Inf (its sum of squares is then not finite): trimming and
    sign election could drop it silently, and the output check would never see it."""
    for key, value in stats.items():
        if key.startswith(("sq_base", "sq_model", "sq_tv")) and not math.isfinite(value):
            raise NonFiniteInput(f"tensor {name!r}: NaN/Inf in the inputs ({key})")


# --------------------------------------------------------------------------- combine
Sparsify = Callable[[int, torch.Tensor], None]


def task_vectors(inputs: MergeInputs) -> torch.Tensor:
    """A fresh [N, ...] tensor of delta_i = theta_i - theta_0 (the inputs stay untouched)."""
    if inputs.base is None:
        raise RecipeError(f"tensor {inputs.name!r}: this method needs a base_model")
    return inputs.models - inputs.base.unsqueeze(0)


def generalized_task_arithmetic(
    inputs: MergeInputs,
    sparsify: Sparsify | None,
    *,
    weight: list[float],
    lam: float,
    normalize: bool,
    consensus: bool,
    bands: Sequence[MagnitudeBand] | None = None,
) -> torch.Tensor:
    """Sparsify each task vector (``sparsify(i, delta_i)`` in place), weight, combine, add base.

    ``bands``, when given, says that ``sparsify`` is exactly a magnitude trim to these bands (one
    per model); the fused kernels then select and trim inside their combine pass instead, and
    a tensor merged in row blocks takes the band values its statistics passes found
    (``TensorBandStatistics``).
    """
    assert inputs.base is not None
    known = inputs.context.get(inputs.name) if isinstance(inputs.context, TensorBands) else None
    if fused.usable(inputs.models):
        return _fused_gta(inputs, sparsify, weight, lam, normalize, consensus, bands, known)
    record_inputs(inputs.stats, inputs, None)
    # In place: the engine hands the stacked models over, and a fresh [N, ...] copy would cost
    # a page fault per 4 KiB on every tensor.
    delta = inputs.models.sub_(inputs.base.unsqueeze(0))
    record_task_vectors(inputs.stats, delta)
    check_finite(inputs.stats, inputs.name)
    if known is not None:
        for i, (lo, hi) in enumerate(known):
            keep_band_(delta[i], lo, hi)
    elif sparsify is not None:
        for i in range(delta.shape[0]):
            sparsify(i, delta[i])
    return combine(delta, inputs.base, weight, lam, normalize, consensus, inputs.stats)


def keep_band_(delta: torch.Tensor, lo: float, hi: float) -> None:
    """Zero the entries with |x| outside [lo, hi], in place."""
    if lo > 0 or hi < math.inf:
        mag = delta.abs()
        delta.masked_fill_((mag < lo) | (mag > hi), 0)


def _fused_gta(
    inputs: MergeInputs,
    sparsify: Sparsify | None,
    weight: list[float],
    lam: float,
    normalize: bool,
    consensus: bool,
    bands: Sequence[MagnitudeBand] | None,
    known: list[tuple[float, float]] | None,
) -> torch.Tensor:
    """``generalized_task_arithmetic`` in three fused passes (ops/fused.py), same numbers."""
    assert inputs.base is not None
    delta = inputs.models
    # Select here only when the statistics passes have not already found the band values.
    selecting = bands if known is None else None
    ranks = [_ranks(b) for b in selecting] if selecting is not None else [[] for _ in range(len(delta))]
    first = fused.task_vectors_(delta, inputs.base, [bool(r) for r in ranks], inputs.stats)
    check_finite(inputs.stats, inputs.name)
    keep = [(0.0, math.inf)] * delta.shape[0]
    if known is not None:
        keep = list(known)
    elif selecting is None:
        if sparsify is not None:
            for i in range(delta.shape[0]):
                sparsify(i, delta[i])
    else:
        selectors = {(i, k): RadixSelect(torch.float32) for i, rs in enumerate(ranks) for k in rs}
        for (i, k), sel in selectors.items():
            sel.absorb(first[i], k)
        del first  # before the next level's histograms
        second = fused.refine_histograms(delta, [(i, sel.prefix) for (i, _), sel in selectors.items()])
        for sel, counts in zip(selectors.values(), second):
            sel.absorb(counts)
        keep = [band_values(b, lambda k, i=i: selectors[i, k].value) for i, b in enumerate(selecting)]
    return fused.combine_into(
        inputs.output_buffer(), delta, inputs.base, keep, weight, lam, normalize, consensus, inputs.stats
    )


# Coordinates per step of the combine: [N, CHUNK] temporaries of a few MB stay in the
# allocator's cache instead of faulting in fresh tensor-sized pages for every intermediate.
CHUNK = 1 << 18


def combine(
    delta: torch.Tensor,
    base: torch.Tensor,
    weight: list[float],
    lam: float,
    normalize: bool,
    consensus: bool,
    stats: dict[str, float],
) -> torch.Tensor:
    """theta_0 + lambda * (weighted sum of sparsified task vectors, agreeing ones only with
    consensus; divided by the (agreeing) weights when ``normalize``), with report statistics.

    Every output element depends only on its own column of ``delta``, so the work goes chunk by
    chunk over the coordinates; the result does not depend on the chunk size.
    """
    n_models = delta.shape[0]
    flat = delta.reshape(n_models, -1)
    base_flat = base.reshape(-1)
    out = torch.empty_like(base_flat)
    wcol = torch.tensor(weight, dtype=delta.dtype, device=delta.device).unsqueeze(1)
    unit_weights = all(w == 1 for w in weight)
    wsum = sum(weight)
    plain_div = 1.0 if abs(wsum) < 1e-8 else wsum  # mergekit's guard without consensus
    kept = torch.zeros(n_models, dtype=torch.int64, device=delta.device)
    sq_kept = torch.zeros(n_models, dtype=torch.float64, device=delta.device)
    counters = torch.zeros(3, dtype=torch.int64, device=delta.device)  # conflict, active, elected +
    sq_delta = sq_out = 0.0
    for start in range(0, flat.shape[1], CHUNK):
        d = flat[:, start : start + CHUNK]
        # (op choices measured: count_nonzero, amax/amin and a sign product are several times
        # faster on CPU than (d != 0).sum, aminmax and torch.where on boolean stacks)
        kept += torch.count_nonzero(d, dim=1)
        sq_kept += (d * d).sum(1, dtype=torch.float64)
        w = d if unit_weights else d * wcol
        total = w.sum(0)
        any_pos, any_neg = w.amax(0) > 0, w.amin(0) < 0
        active = any_pos | any_neg
        counters[0] += (any_pos & any_neg).sum()
        counters[1] += active.sum()
        if consensus:
            positive = total >= 0
            counters[2] += (positive & active).sum()
            # sign(w_i) == elected sign (+1 where total >= 0, else -1); zeros never agree
            agree = (w * torch.where(positive, 1.0, -1.0)) > 0
            merged = (w * agree).sum(0)
            if normalize:
                divisor = (wcol * agree).sum(0)
                merged.div_(divisor.masked_fill_(divisor == 0, 1))
        else:
            merged = total
            if normalize:
                merged = merged / plain_div
        if lam != 1:
            merged.mul_(lam)
        sq_delta += float(torch.linalg.vector_norm(merged)) ** 2
        res = out[start : start + CHUNK]
        torch.add(base_flat[start : start + CHUNK], merged, out=res)
        sq_out += float(torch.linalg.vector_norm(res)) ** 2
    for i in range(n_models):
        stats[f"kept[{i}]"] = float(kept[i])
        stats[f"sq_kept[{i}]"] = float(sq_kept[i])
    stats["conflict"], stats["active"] = float(counters[0]), float(counters[1])
    if consensus:
        stats["elected_pos"] = float(counters[2])
        stats["elected_neg"] = stats["active"] - stats["elected_pos"]
    stats["sq_delta_out"] = sq_delta
    stats["sq_out"] = sq_out
    return out.reshape(base.shape)


# --------------------------------------------------------------------------- statistics
def _sq(x: torch.Tensor) -> float:
    # The norm in the compute dtype (torch sums float32 in cascades: ~1e-7 relative), squared
    # in double so sums over tensors stay additive; no float64 copy of a huge tensor.
    return float(torch.linalg.vector_norm(x)) ** 2 if x.numel() else 0.0


def record_inputs(stats: dict[str, float], inputs: MergeInputs, delta: torch.Tensor | None) -> None:
    """Additive per-tensor numbers about the inputs: sizes, sums of squares, non-zeros."""
    n = inputs.models[0].numel()
    stats["numel"] = float(n)
    if inputs.base is not None:
        stats["sq_base"] = _sq(inputs.base)
    for i in range(inputs.models.shape[0]):
        stats[f"sq_model[{i}]"] = _sq(inputs.models[i])
    if delta is not None:
        record_task_vectors(stats, delta)


def record_task_vectors(stats: dict[str, float], delta: torch.Tensor) -> None:
    """Additive per-tensor numbers about the task vectors: sums of squares, non-zeros."""
    for i in range(delta.shape[0]):
        stats[f"sq_tv[{i}]"] = _sq(delta[i])
        stats[f"nonzero_tv[{i}]"] = float(torch.count_nonzero(delta[i]))


def record_signs(stats: dict[str, float], weighted: torch.Tensor, elected_pos: torch.Tensor | None) -> None:
    """Coordinates where kept entries have both signs, and the elected sign balance."""
    any_pos = (weighted > 0).any(0)
    any_neg = (weighted < 0).any(0)
    stats["conflict"] = float((any_pos & any_neg).sum())
    active = any_pos | any_neg
    stats["active"] = float(active.sum())
    if elected_pos is not None:
        pos = float((elected_pos & active).sum())
        stats["elected_pos"] = pos
        stats["elected_neg"] = stats["active"] - pos


def record_output(stats: dict[str, float], inputs: MergeInputs, out: torch.Tensor) -> None:
    stats["sq_out"] = _sq(out)
    if inputs.base is not None:
        stats["sq_delta_out"] = _sq(out - inputs.base)


def summarize(totals: dict[str, float], refs: list[str], context: Any = None) -> dict[str, Any]:
    """merge_report.json's summary for this family: densities, sign conflicts, norms."""
    n = totals.get("numel", 0.0)
    out: dict[str, Any] = {"coordinates": int(n)}
    lines: list[str] = []
    models = []
    for i, ref in enumerate(refs):
        row: dict[str, Any] = {"model": ref}
        if f"kept[{i}]" in totals and n:
            row["kept_density"] = totals[f"kept[{i}]"] / n
        if f"nonzero_tv[{i}]" in totals and n:
            row["nonzero_task_vector_density"] = totals[f"nonzero_tv[{i}]"] / n
        for key, name in (("sq_tv", "task_vector_norm"), ("sq_kept", "kept_norm"), ("sq_model", "norm")):
            if f"{key}[{i}]" in totals:
                row[name] = math.sqrt(totals[f"{key}[{i}]"])
        models.append(row)
        if "kept_density" in row:
            lines.append(
                f"  {ref}: kept {row['kept_density']:.2%} of coordinates "
                f"(task vector non-zero in {row.get('nonzero_task_vector_density', 0):.2%}), "
                f"|tv| {row.get('task_vector_norm', 0):.4g} -> kept {row.get('kept_norm', 0):.4g}"
            )
    out["models"] = models
    if "conflict" in totals and n:
        out["sign_conflict_fraction"] = totals["conflict"] / n
        out["active_fraction"] = totals.get("active", 0.0) / n
        active = totals.get("active", 0.0)
        out["sign_conflict_fraction_of_active"] = totals["conflict"] / active if active else 0.0
        lines.append(
            f"  sign conflicts: {out['sign_conflict_fraction']:.2%} of coordinates "
            f"({out['sign_conflict_fraction_of_active']:.2%} of those with a kept entry)"
        )
    if "elected_pos" in totals:
        decided = totals["elected_pos"] + totals["elected_neg"]
        out["elected_positive_fraction"] = totals["elected_pos"] / decided if decided else 0.0
        lines.append(f"  elected sign: {out['elected_positive_fraction']:.2%} positive")
    norms = (("sq_base", "base_norm"), ("sq_out", "output_norm"), ("sq_delta_out", "merged_delta_norm"))
    for key, name in norms:
        if key in totals:
            out[name] = math.sqrt(totals[key])
    if "output_norm" in out:
        extra = f", |output - base| {out['merged_delta_norm']:.4g}" if "merged_delta_norm" in out else ""
        base = f"|base| {out['base_norm']:.4g}, " if "base_norm" in out else ""
        lines.append(f"  norms: {base}|output| {out['output_norm']:.4g}{extra}")
    out["lines"] = lines
    return out
