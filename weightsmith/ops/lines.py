"""LiNeS: post-training layer scaling of a task vector (or of a merged multi-task vector).

Wang, Dimitriadis et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances
Model Merging", ICLR 2025 (arXiv 2410.17146); reference code wang-kee/LiNeS.

For a parameter in residual block l of L (l = 0 at the input side):

    theta = theta_0 + (alpha + beta * l / (L - 1)) * tau

and parameters outside the blocks (embeddings, final norm, heads) get ``alpha``. With one model
tau is its task vector (single-task mode: the paper picks alpha on validation and sets
beta = 1 - alpha, so the last block keeps the whole update). With several, tau is their merged
task vector from ``merge: task_arithmetic | ties`` with lambda 1 (the existing operators do the
math); ``alpha`` defaults to the paper's rule alpha = ||sum_t w_t tau_t||_1 / (T ||tau_MTL||_1),
model-wide L1 norms found by one streamed statistics pass (after TIES' own passes with
``scope: model``), and ``beta`` is the tuned knob. Blocks are found by architecture-aware name
patterns (``block_pattern`` overrides them). See docs/methods/lines.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from weightsmith.errors import MergeError, RecipeError
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, TensorSpec, get_method, register
from weightsmith.ops.statistics import GlobalStatistics

# Default block patterns, tried in order; the first that matches any tensor is used for all.
# Each names the container of a family's residual blocks explicitly, because a bare ".N." also
# matches numbered sub-modules (T5's block.N.layer.M, Sequential indices).
BLOCK_PATTERNS: tuple[tuple[str, str], ...] = (
    ("HF decoder / HF CLIP (model.layers.N)", r"(?:^|\.)layers\.(\d+)\."),
    ("BERT / MiniLM (encoder.layer.N)", r"(?:^|\.)encoder\.layer\.(\d+)\."),
    ("open_clip ViT (transformer.resblocks.N)", r"(?:^|\.)resblocks\.(\d+)\."),
    ("GPT-2 (transformer.h.N)", r"(?:^|\.)h\.(\d+)\."),
)
MERGES = ("task_arithmetic", "ties")
AUTO = "auto"


@dataclass(frozen=True)
class LinesContext:
    """What plan time and the statistics passes found; the output pass applies it."""

    pattern: str
    blocks: int  # L
    auto_alpha: float | None  # the L1-ratio / T rule's value, where some tensor asked for it
    inner: Any = None  # the merge method's own global statistics (ties scope: model)
    l1_sum: float | None = None  # ||sum_t w_t tau_t||_1 over the model
    l1_merged: float | None = None  # ||tau_MTL||_1 over the model
    pattern_label: str = ""
    block_of: dict[str, int] = field(default_factory=dict, compare=False, repr=False)


def compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise RecipeError(f"parameters.block_pattern: {pattern!r} is not a valid regex ({e})") from None
    if compiled.groups < 1:
        raise RecipeError(
            f"parameters.block_pattern: {pattern!r} has no capture group; it must capture the "
            r"block index, e.g. 'encoder\.layer\.(\d+)\.'"
        )
    return compiled


def block_index(pattern: re.Pattern[str], name: str) -> int | None:
    """The block index of tensor ``name`` under ``pattern`` (None: outside every block)."""
    m = pattern.search(name)
    if m is None:
        return None
    try:
        return int(m.group(1))
    except (TypeError, ValueError):
        raise RecipeError(
            f"parameters.block_pattern: {pattern.pattern!r} matched tensor {name!r} but its first "
            f"group captured {m.group(1)!r}, not a block number"
        ) from None


def find_blocks(names: list[str], block_pattern: str | None) -> tuple[str, str, dict[str, int], int]:
    """(pattern, label, name -> block index, L) for these tensor names.

    Raises RecipeError when no tensor is in a block: treating every tensor as outside the blocks
    would silently turn LiNeS into uniform scaling by alpha.
    """
    candidates = (
        [("block_pattern", block_pattern)] if block_pattern is not None else list(BLOCK_PATTERNS)
    )
    for label, pattern in candidates:
        compiled = compile_pattern(pattern)
        found = {n: i for n in names if (i := block_index(compiled, n)) is not None}
        if found:
            blocks = max(found.values()) + 1
            if blocks < 2:
                raise RecipeError(
                    f"LiNeS: block pattern {pattern!r} finds a single block (index 0); the schedule "
                    "alpha + beta l/(L-1) needs L >= 2 blocks. Check block_pattern, or use "
                    "task_arithmetic with lambda for a uniform scale"
                )
            return pattern, label, found, blocks
    shown = ", ".join(repr(n) for n in names[:4]) + (" ..." if len(names) > 4 else "")
    tried = "; ".join(p for _, p in candidates)
    raise RecipeError(
        f"LiNeS: no tensor name matches the block pattern(s) {tried} (tensors: {shown}). Set "
        r"parameters.block_pattern to a regex whose first group captures the block index, e.g. "
        r"'blocks\.(\d+)\.'"
    )


def _sub_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The merge method's parameters for one tensor, with lambda 1 (LiNeS does the scaling)."""
    out: dict[str, Any] = {"weight": params["weight"], "lambda": 1.0}
    normalize = _flag(params.get("normalize"))
    if method == "task_arithmetic":
        out["normalize"] = False if normalize is None else normalize
    else:
        out.update(
            density=params["density"],
            normalize=True if normalize is None else normalize,
            rescale=False,
            int8_mask=False,
            scope=params["scope"],
            aggregation=params["aggregation"],
        )
    return out


def _flag(value: Any) -> bool | None:
    """normalize: None (the merge method's default), a YAML bool or its spelling as a string."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RecipeError(f"parameters.normalize: must be true or false, got {value!r}")


def _number(value: Any, name: str, where: str, allow_auto: bool) -> float | str | None:
    """A scale parameter's value: None (unset), "auto" where allowed, or a finite float.

    Numbers may arrive as strings (YAML 1.1 reads 1e-3 as one), so they are parsed here.
    """
    if value is None or (allow_auto and value == AUTO):
        return value
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        want = "a number or auto" if allow_auto else "a number"
        raise RecipeError(f"parameters.{name}: must be {want}, got {value!r} ({where})")
    return number


def merged_task_vector(inputs: MergeInputs, params: dict[str, Any], inner: Any) -> torch.Tensor:
    """tau_MTL for this tensor, computed by the merge method itself.

    The method runs on the task vectors against a zero base, so it returns the merged task
    vector directly instead of base + tau_MTL (subtracting the base again would round). Task
    vectors are invariant to that shift, so every threshold and sign comes out the same.
    Overwrites ``inputs.models``.
    """
    assert inputs.base is not None
    merge = params["merge"]
    tau = inputs.models.sub_(inputs.base.unsqueeze(0))
    sub = MergeInputs(inputs.name, tau, torch.zeros_like(inputs.base), context=inner, out=inputs.out)
    return get_method(merge).fn(sub, **_sub_params(merge, params))


def _resolve_alpha(alpha: Any, ctx: LinesContext, name: str) -> float:
    value = _number(alpha, "alpha", f"tensor {name!r}", allow_auto=True)
    if value == AUTO:
        if ctx.auto_alpha is None:
            raise MergeError(f"tensor {name!r}: LiNeS alpha: auto needs the statistics pass")
        return ctx.auto_alpha
    assert isinstance(value, float)
    return value


def lines(inputs: MergeInputs, **params: Any) -> torch.Tensor:
    ctx = inputs.context
    if not isinstance(ctx, LinesContext):
        raise MergeError(
            f"tensor {inputs.name!r}: lines needs its plan-time block map (and, for alpha: auto, "
            "the model-wide statistics pass); run it through the merge engine (weightsmith merge)"
        )
    assert inputs.base is not None
    alpha = _resolve_alpha(params["alpha"], ctx, inputs.name)
    beta = _number(params["beta"], "beta", f"tensor {inputs.name!r}", allow_auto=False)
    # One model without beta: the paper's single-task rule, the last block keeps scale 1.
    beta = 1.0 - alpha if beta is None else beta
    assert isinstance(beta, float)
    layer = ctx.block_of.get(inputs.name)  # plan time mapped every tensor in a block
    scale = alpha if layer is None else alpha + beta * layer / (ctx.blocks - 1)
    numel = inputs.base.numel()
    inputs.stats["numel"] = float(numel)
    inputs.stats["scale_x_numel"] = scale * numel
    inputs.stats["in_block_numel"] = float(numel) if layer is not None else 0.0
    tau = merged_task_vector(inputs, params, ctx.inner)
    # theta_0 + lambda(l) * tau, in the reference's order (scale, then add the base).
    return tau.mul_(scale).add_(inputs.base)


class LinesStatistics(GlobalStatistics):
    """The merge method's own passes (ties scope: model) first, then, if alpha: auto, one pass
    summing ||sum_t w_t tau_t||_1 and ||tau_MTL||_1 over the whole model."""

    def __init__(
        self, base: LinesContext, inner: GlobalStatistics | None, need_alpha: bool, n_models: int
    ) -> None:
        self.base = base
        self.inner = inner
        self.n_models = n_models
        self.norms: tuple[float, float] | None = None if need_alpha else (math.nan, math.nan)
        self.need_alpha = need_alpha
        self.phase = ""
        self.planned_passes = (inner.planned_passes if inner is not None else 0) + int(need_alpha)

    def wants_pass(self) -> bool:
        if self.inner is not None and self.inner.wants_pass():
            self.phase = "inner"
            return True
        self.phase = "norms"
        return self.norms is None

    def collect(self, inputs: MergeInputs, **params: Any) -> Any:
        if self.phase == "inner":
            assert self.inner is not None
            return self.inner.collect(inputs, **_sub_params(params["merge"], params))
        assert inputs.base is not None
        tau = inputs.models - inputs.base.unsqueeze(0)
        weighted = tau[0] * params["weight"][0]
        for i in range(1, tau.shape[0]):
            weighted.add_(tau[i], alpha=params["weight"][i])
        l1_sum = float(weighted.abs().sum(dtype=torch.float64))
        inner = self.inner.result() if self.inner is not None else None
        merged = merged_task_vector(inputs, params, inner)
        return [l1_sum, float(merged.abs().sum(dtype=torch.float64))]

    def combine(self, a: Any, b: Any) -> Any:
        if self.phase == "inner":
            assert self.inner is not None
            return self.inner.combine(a, b)
        return super().combine(a, b)

    def absorb(self, total: Any) -> None:
        if self.phase == "inner":
            assert self.inner is not None
            self.inner.absorb(total)
            return
        self.norms = (0.0, 0.0) if total is None else (float(total[0]), float(total[1]))

    def result(self) -> LinesContext:
        inner = self.inner.result() if self.inner is not None else None
        auto_alpha = None
        l1_sum = l1_merged = None
        if self.need_alpha:
            assert self.norms is not None
            l1_sum, l1_merged = self.norms
            if not l1_merged > 0:
                raise MergeError(
                    "LiNeS alpha: auto: the merged task vector is zero everywhere, so the L1-ratio "
                    "rule is undefined; are the models identical to the base? Set alpha explicitly"
                )
            auto_alpha = l1_sum / (self.n_models * l1_merged)
        return LinesContext(
            self.base.pattern,
            self.base.blocks,
            auto_alpha,
            inner,
            l1_sum,
            l1_merged,
            self.base.pattern_label,
            self.base.block_of,
        )


def prepare(specs: list[TensorSpec], dtype: torch.dtype) -> LinesStatistics:
    if not specs:
        raise RecipeError("LiNeS: the model has no floating-point tensors to scale")
    params0 = specs[0].params
    n_models = len(params0["weight"])
    merge = params0["merge"]
    need_alpha = False
    for spec in specs:
        p = spec.params
        if p["merge"] not in MERGES:
            raise RecipeError(
                f"parameters.merge: LiNeS builds the multi-task vector with "
                f"{' | '.join(MERGES)}, got {p['merge']!r}"
            )
        if p["merge"] != merge:
            raise RecipeError("parameters.merge: must be the same for every tensor")
        if p["block_pattern"] != params0["block_pattern"]:
            raise RecipeError("parameters.block_pattern: must be the same for every tensor")
        _number(p["alpha"], "alpha", f"tensor {spec.name!r}", allow_auto=True)
        _number(p["beta"], "beta", f"tensor {spec.name!r}", allow_auto=False)
        _flag(p["normalize"])
        if p["alpha"] == AUTO:
            if n_models == 1:
                raise RecipeError(
                    "parameters.alpha: single-task LiNeS (one model) needs alpha, the scale of the "
                    "first block: the paper picks it on validation from 0.0, 0.1, ..., 1.0 (beta "
                    "then defaults to 1 - alpha, so the last block keeps the whole update)"
                )
            need_alpha = True
        if p["beta"] is None and n_models > 1:
            raise RecipeError(
                "parameters.beta: multi-task LiNeS needs beta, its one tuned hyperparameter (the "
                "paper searches the baseline's lambda grid: 0.1..1.0 for task_arithmetic, "
                "0.1..1.5 for ties); alpha defaults to the L1-ratio / T rule"
            )
    block_pattern = params0["block_pattern"]
    if block_pattern is not None and not isinstance(block_pattern, str):
        raise RecipeError(f"parameters.block_pattern: must be a regex string, got {block_pattern!r}")
    pattern, label, block_of, blocks = find_blocks([s.name for s in specs], block_pattern)
    method = get_method(merge)
    inner = None
    if method.prepare is not None:
        sub_specs = [
            TensorSpec(s.name, s.shape, _sub_params(merge, s.params), models=s.models) for s in specs
        ]
        inner = method.prepare(sub_specs, dtype)
    base = LinesContext(pattern, blocks, None, pattern_label=label, block_of=block_of)
    return LinesStatistics(base, inner, need_alpha, n_models)


def summarize(totals: dict[str, float], refs: list[str], context: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lines_out: list[str] = []
    if isinstance(context, LinesContext):
        out.update(
            block_pattern=context.pattern,
            blocks=context.blocks,
            blocked_tensors=len(context.block_of),
        )
        lines_out.append(
            f"  LiNeS: {context.blocks} blocks by {context.pattern_label or context.pattern} "
            f"({len(context.block_of)} tensors in blocks)"
        )
        if context.auto_alpha is not None:
            out.update(auto_alpha=context.auto_alpha, l1_sum=context.l1_sum, l1_merged=context.l1_merged)
            lines_out.append(
                f"  alpha (L1-ratio / T rule) = {context.auto_alpha:.6g} "
                f"(||sum w tau||_1 {context.l1_sum:.6g}, ||tau_MTL||_1 {context.l1_merged:.6g})"
            )
    numel = totals.get("numel")
    if numel and "scale_x_numel" in totals:
        out["mean_scale"] = totals["scale_x_numel"] / numel
        lines_out.append(f"  mean scale over parameters: {out['mean_scale']:.4g}")
    out["lines"] = lines_out
    return out


register(
    MergeMethod(
        name="lines",
        fn=lines,
        params=(
            Param("alpha", AUTO, kind=str, doc="scale outside blocks and of block 0; auto: L1-ratio/T"),
            Param("beta", None, kind=str, doc="added scale at the last block; one model: 1 - alpha"),
            Param("merge", "task_arithmetic", kind=str, doc="several models: task_arithmetic | ties"),
            Param("block_pattern", None, kind=str, doc="regex capturing the block index"),
            Param("weight", 1.0, per_model=True, doc="task vector coefficient in the merge"),
            Param("density", 1.0, per_model=True, doc="merge: ties: fraction kept"),
            Param("normalize", None, kind=str, doc="merge's normalize (default: that method's)"),
            Param("scope", "tensor", kind=str, doc="merge: ties: tensor | model"),
            Param("aggregation", "dis-mean", kind=str, doc="merge: ties, scope model: dis-mean..."),
        ),
        base="required",
        summary="base + (alpha + beta l/(L-1)) * tau per block l (tau: one task vector or their merge)",
        paper="arXiv:2410.17146",
        elementwise=lambda p: p.get("merge") == "task_arithmetic" or p.get("scope") == "model",
        prepare=prepare,
        summarize=summarize,
    )
)
