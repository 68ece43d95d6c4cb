"""The memory plan of ``extract-lora`` (and of ``out_format: lora``'s SVD re-factor), from the
two checkpoints' headers alone: per tensor, the peak its step holds (a truncated or randomized
SVD with its LAPACK scratch, or a compare / whole copy), checked against ``--memory-budget``
before any output is written, like the merge path's refusal of an unsplittable tensor.

Which tensors are factored, compared or copied follows ``lora_extraction._extract`` (which
imports its selection rules from here, so the two cannot drift apart).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from weightsmith.errors import MergeError
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.ops.lowrank import compare_peak_bytes, factor_peak_bytes
from weightsmith.output_checks import budget_option
from weightsmith.units import format_size, parse_size

# Randomized SVD is used (svd=auto, fixed --rank) when rank + 8 <= min(shape) / 4: on 1024^2
# matrices it was within 0.62 % of the optimal error (flat spectrum; <= 0.2 % for decaying
# ones) at 5-20x less time; see docs/methods/lora.md for the measurement.
RANDOMIZED_FRACTION = 4
# Last name component of input embeddings (nn.Embedding: LoRA only with --embed-lora).
EMBEDDING_NAMES = frozenset({
    "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
    "token_type_embeddings", "embed_positions", "tok_embeddings", "shared",
})


def matches(pattern: str, name: str) -> bool:
    """Regex search (as --freeze in finetune); an invalid regex is a plain substring."""
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return pattern in name


def pick_method(svd: str, rank: int | None, shape: tuple[int, ...]) -> str:
    if svd != "auto":
        return svd
    small = rank is not None and (rank + 8) * RANDOMIZED_FRACTION <= min(shape)
    return "randomized" if small else "exact"


def is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in EMBEDDING_NAMES


def group_modules(ft: Checkpoint) -> dict[str, list[str]]:
    """The fine-tune's tensor names by module (the name up to its last dot)."""
    modules: dict[str, list[str]] = {}
    for key in ft.keys():
        modules.setdefault(key.rsplit(".", 1)[0] if "." in key else key, []).append(key)
    return modules


def selected(keys: list[str], include: Sequence[str], exclude: Sequence[str]) -> list[str]:
    keys = [k for k in keys if not include or any(matches(p, k) for p in include)]
    return [k for k in keys if not any(matches(p, k) for p in exclude)]


def saved_whole(module: str, keys: list[str], save_modules: Sequence[str]) -> bool:
    return any(matches(p, module) or any(matches(p, k) for k in keys) for p in save_modules)


@dataclass(frozen=True)
class TensorPeak:
    name: str
    shape: tuple[int, ...]
    step: str  # "svd exact" | "svd randomized" | "compare" | "copy"
    peak: int  # bytes, with the model's margin (ops/lowrank.py)


@dataclass
class ExtractPlan:
    tensors: list[TensorPeak] = field(default_factory=list)
    memory_budget: int | None = None  # None: unlimited

    @property
    def biggest(self) -> TensorPeak | None:
        return max(self.tensors, key=lambda t: t.peak, default=None)

    @property
    def peak(self) -> int:
        return self.biggest.peak if self.biggest else 0

    @property
    def fits(self) -> bool:
        return self.memory_budget is None or self.peak <= self.memory_budget

    def lines(self, top: int = 5, title: str = "lora re-factor:") -> list[str]:
        """What ``extract-lora --plan`` and ``weightsmith plan`` print."""
        svds = [t for t in self.tensors if t.step.startswith("svd")]
        budget = "unlimited" if self.memory_budget is None else format_size(self.memory_budget)
        out = [
            f"{title:16s} {len(svds)} SVDs, {len(self.tensors) - len(svds)} tensors compared or "
            f"copied; peak {format_size(self.peak)} per tensor (SVD scratch included), budget {budget}"
        ]
        for t in sorted(self.tensors, key=lambda t: -t.peak)[:top]:
            shape = "x".join(map(str, t.shape))
            out.append(f"  {t.name:56s} {shape:>12s} {t.step:15s} peak {format_size(t.peak)}")
        if not self.fits:
            fits = budget_option(self.peak)
            out.append(f"  over budget: refused; it runs with --memory-budget {fits} or more")
        return out

    def as_dict(self) -> dict[str, Any]:
        big = self.biggest
        return {
            "peak_bytes": self.peak,
            "memory_budget": self.memory_budget,
            "fits": self.fits,
            "biggest": None if big is None else {
                "tensor": big.name, "shape": list(big.shape), "step": big.step, "peak_bytes": big.peak,
            },
            "svds": sum(t.step.startswith("svd") for t in self.tensors),
        }


def plan_extraction(
    ft: Checkpoint,
    bs: Checkpoint,
    *,
    rank: int | None,
    energy: float | None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    save_modules: Sequence[str] = (),
    embed_lora: bool = False,
    svd: str = "auto",
    memory_budget: str | int | None = None,
) -> ExtractPlan:
    """Each tensor's peak, as ``_extract`` will process it (see the module docstring)."""
    plan = ExtractPlan(memory_budget=None if memory_budget is None else _parse_budget(memory_budget))
    for module, all_keys in group_modules(ft).items():
        keys = selected(all_keys, include, exclude)
        if not keys or any(k not in bs for k in keys):
            continue  # excluded, or not captured: nothing read
        if any(ft.entry(k).shape != bs.entry(k).shape for k in keys):
            continue  # refused by _extract with its own message
        if saved_whole(module, keys, save_modules):
            for k in all_keys:
                e = ft.entry(k)
                peak = compare_peak_bytes(_numel(e.shape), (e.dtype.itemsize, 0))
                plan.tensors.append(TensorPeak(k, tuple(e.shape), "copy", peak))
            continue
        weight = f"{module}.weight"
        factorable = weight in keys and len(ft.entry(weight).shape) == 2
        for k in keys:
            fe, be = ft.entry(k), bs.entry(k)
            items = (fe.dtype.itemsize, be.dtype.itemsize)
            if k == weight and factorable and (embed_lora or not is_embedding(module)):
                shape = tuple(fe.shape)
                method = pick_method(svd, rank, shape) if energy is None else "exact"
                r = min(shape) if energy is not None else int(rank or 0)
                peak = factor_peak_bytes(shape, r, method, items)
                plan.tensors.append(TensorPeak(k, shape, f"svd {method}", peak))
            else:
                peak = compare_peak_bytes(_numel(fe.shape), items)
                plan.tensors.append(TensorPeak(k, tuple(fe.shape), "compare", peak))
    return plan


def check_extraction_fits(plan: ExtractPlan, what: str = "extract-lora") -> None:
    """Refuse, before any output, a tensor whose step passes the memory budget."""
    if plan.fits:
        return
    big = plan.biggest
    assert big is not None and plan.memory_budget is not None
    over = [t for t in plan.tensors if t.peak > plan.memory_budget]
    others = f" (and {len(over) - 1} more)" if len(over) > 1 else ""
    hint = (
        "--svd randomized with a small --rank (it needs far less), " if big.step == "svd exact" else ""
    )
    raise MergeError(
        f"tensor {big.name!r} {list(big.shape)}{others}: {what}'s {big.step} of it needs about "
        f"{big.peak:,} bytes ({format_size(big.peak)}) of memory, SVD scratch included, over the "
        f"memory budget of {plan.memory_budget:,} bytes ({format_size(plan.memory_budget)}). Pass "
        f"--memory-budget {budget_option(big.peak)} (memory_budget= in Python) or more, or use "
        f"{hint}or --exclude it"
    )


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _parse_budget(value: str | int) -> int:
    from weightsmith.errors import RecipeError

    try:
        return parse_size(value)
    except ValueError as e:
        raise RecipeError(f"memory budget: {e}") from None
