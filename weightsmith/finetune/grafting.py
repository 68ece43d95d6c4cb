"""Skill grafting's mask search (Panigrahi et al., ICML 2023), driven by the finetune engine.

The math (top-s start, sigmoid parametrisation, hand-written gradient, rounding) lives in
weightsmith/ops/graft.py; this module feeds it data: it loads the pre-trained model once,
writes theta_pre + gamma * delta into it, takes the gradient of the mean task loss, steps the
scores S, and scores each rounded mask with the finetune Evaluator on train (+ validation),
keeping the best one as the reference does.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from weightsmith.errors import CheckpointError, DataError
from weightsmith.finetune.data import Dataset, check_task, load_jsonl
from weightsmith.finetune.encoding import IGNORE_INDEX, batches, collate, encode, pad_id
from weightsmith.finetune.evaluation import prepare
from weightsmith.finetune.evaluator import Evaluator
from weightsmith.finetune.losses import classification_logits, lm_token_losses
from weightsmith.finetune.modeling import KeyResolver, iter_safetensors
from weightsmith.finetune.options import OptionError
from weightsmith.ops.graft import (
    SIGMOID_BIAS,
    check_sparsity,
    gamma,
    rounded,
    score_gradient,
    top_fraction_mask,
)

REFERENCE_LR = 1e7  # the reference scripts' mask learning rate (RoBERTa-base, SGD-lr deltas)


@dataclass
class GraftResult:
    """The best rounded mask and how the search got there."""

    mask: dict[str, torch.Tensor]  # bool, by checkpoint name, every floating tensor of the model
    region: list[str]  # tensors the mask may graft
    grafted: int  # entries set in ``mask``
    region_size: int
    best_step: int  # 0 = the top-s base patch itself
    best_score: float
    lr: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        return self.grafted / self.region_size if self.region_size else 0.0

    def save(self, path: str | Path) -> Path:
        """The mask as a safetensors file that ``merge_method: graft`` reads."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.mask.items()},
            str(path),
            metadata={"format": "weightsmith-graft-mask", "grafted": str(self.grafted)},
        )
        return path


def _load_states(pre_dir: Path, ft_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    pre = dict(iter_safetensors(pre_dir))
    ft = dict(iter_safetensors(ft_dir))
    for name, t in pre.items():
        if not t.dtype.is_floating_point:
            continue
        if name not in ft:
            raise CheckpointError(
                f"{ft_dir}: has no tensor {name!r}, which {pre_dir} has; grafting needs the "
                "fine-tune of exactly this pre-trained model (same architecture and names)"
            )
        if ft[name].shape != t.shape:
            raise CheckpointError(
                f"{ft_dir}: tensor {name!r} has shape {list(ft[name].shape)} but {pre_dir} has "
                f"{list(t.shape)}; grafting needs one architecture"
            )
    return pre, ft


def auto_rate(score_grads: torch.Tensor, sparsity: float) -> float:
    """lr for ``lr="auto"``: the top-``sparsity`` fraction of the first step's nonzero score
    gradients move S by at least 1 per step.

    S must travel ~c = 10 to flip an entry, and sigmoid'(S - c) grows as it does, so entries
    moved by ~1 per step flip within a few steps and the rest barely move: the search changes
    roughly as many entries as the start patch holds, instead of flipping everything at once
    (a rate scaled to the mean gradient grew a 0.1% patch to ~14% in 10 steps on TinyLM).
    """
    mags = score_grads.abs()
    k = max(1, round(sparsity * mags.numel()))
    return 1.0 / float(torch.topk(mags, min(k, mags.numel())).values[-1])


def _region(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    if not patterns:
        return list(names)
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise OptionError(f"--region {p!r}: not a valid regex ({e})") from None
    chosen = [n for n in names if any(c.search(n) for c in compiled)]
    if not chosen:
        raise OptionError(f"--region {list(patterns)}: no floating tensor of the model matches")
    return chosen


def _dataset(data: str | Path | Dataset, task: str) -> Dataset:
    return data if isinstance(data, Dataset) else load_jsonl(data, task)


def optimize_graft(
    pre_dir: str | Path,
    ft_dir: str | Path,
    data: str | Path | Dataset,
    task: str,
    sparsity: float,
    *,
    val: str | Path | Dataset | None = None,
    steps: int = 10,
    lr: float | str = REFERENCE_LR,
    sigmoid_bias: float = SIGMOID_BIAS,
    batch_size: int = 16,
    max_length: int = 128,
    truncate: bool = False,
    region: Sequence[str] = (),
    metric: str | None = None,
    seed: int = 0,
    quiet: bool = True,
) -> GraftResult:
    """Search a graft mask for FT over PRE on ``data`` (the reference's procedure).

    Start from the top-``sparsity`` fraction of |FT - PRE| over the region; each step takes the
    full-data gradient of the mean task loss at theta_pre + gamma * delta and moves S by plain
    gradient descent; after every step (and for the start) the rounded mask is scored as
    metric(train) + metric(val) and the best is kept. ``lr="auto"`` scales the rate to this model
    (see ``auto_rate``): the reference's 1e7 is tuned to RoBERTa's deltas and gradients, and
    tiny models can be orders of magnitude off.
    Dropout is off throughout, so a search is a pure function of its inputs and ``seed``.
    """
    started = time.perf_counter()
    check_task(task)
    check_sparsity(sparsity)
    if steps < 0:
        raise OptionError(f"graft steps must be >= 0, got {steps}")
    if not (lr == "auto" or (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr))):
        raise OptionError(f"graft lr must be a positive number or 'auto', got {lr!r}")
    pre_dir, ft_dir = Path(pre_dir), Path(ft_dir)
    train = _dataset(data, task)
    loaded, train = prepare(pre_dir, train, task, max_length, truncate, require_head=False, seed=seed)
    model = loaded.model.eval()
    pre, ft = _load_states(pre_dir, ft_dir)
    floating = [n for n, t in pre.items() if t.dtype.is_floating_point]
    resolver = KeyResolver(model)
    params = dict(model.named_parameters())
    names = _region(floating, region)
    keys = {}
    for n in names:
        key = resolver.resolve(n)
        if key is None or key not in params:
            raise CheckpointError(f"{pre_dir}: tensor {n!r} is not a parameter of the {task} model")
        keys[n] = key
    pre_f = {n: pre[n].float() for n in names}
    delta = {n: ft[n].float() - pre_f[n] for n in names}
    b = top_fraction_mask(delta, sparsity)
    gen = torch.Generator().manual_seed(seed)
    S = {n: torch.rand(delta[n].shape, generator=gen) for n in names}

    features = encode(train, loaded.tokenizer, max_length, truncate)
    pad = pad_id(loaded.tokenizer)
    if task == "classification":
        denominator = len(features)
    else:
        denominator = sum(sum(t != IGNORE_INDEX for t in f.labels[1:]) for f in features)  # type: ignore[index]
    denominator = max(denominator, 1)
    # Scoring runs the finetune Evaluator on its own model copy: the mask's score must not
    # depend on what the gradient passes left in ``model``.
    scoring = {"batch_size": max(batch_size, 32), "max_length": max_length, "truncate": truncate}
    evaluators = [Evaluator(pre_dir, train, task, metric, **scoring)]
    if val is not None:
        evaluators.append(Evaluator(pre_dir, _dataset(val, task), task, metric, **scoring))
    sign = 1.0 if evaluators[0].higher_is_better else -1.0

    def score(mask: dict[str, torch.Tensor]) -> list[float]:
        weights = {n: pre_f[n] + mask[n].float() * delta[n] for n in names}
        return [ev.score(weights) for ev in evaluators]

    def gradients() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for n in names:
                params[keys[n]].copy_(pre_f[n] + gamma(S[n], b[n], sigmoid_bias) * delta[n])
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(False)
        for n in names:
            params[keys[n]].requires_grad_(True)
        for chunk in batches(features, batch_size):
            batch = collate(chunk, pad)
            if task == "classification":
                loss = torch.nn.functional.cross_entropy(
                    classification_logits(model, batch), batch["labels"], reduction="sum"
                )
            else:
                loss, _ = lm_token_losses(model, batch)
            (loss / denominator).backward()
        out = {}
        for n in names:
            g = params[keys[n]].grad
            out[n] = g.detach().clone() if g is not None else torch.zeros_like(delta[n])
        return out

    current = {n: b[n].clone() for n in names}
    scores = score(current)
    best = (sign * sum(scores), 0, current)
    history = [{"step": 0, "grafted": float(sum(int(m.sum()) for m in current.values())),
                **{f"score_{i}": s for i, s in enumerate(scores)}}]
    rate = None if lr == "auto" else float(lr)
    for step in range(1, steps + 1):
        grads = gradients()
        g_s = {n: score_gradient(grads[n], delta[n], S[n], b[n], sigmoid_bias) for n in names}
        if rate is None:
            moving = torch.cat([g.reshape(-1) for g in g_s.values()])
            moving = moving[moving != 0]
            if moving.numel() == 0:
                raise DataError(
                    "graft: the loss gradient is zero on every grafted coordinate; is the fine-tune "
                    "identical to the pre-trained model on the region?"
                )
            rate = auto_rate(moving, sparsity)
        for n in names:
            S[n].sub_(g_s[n], alpha=rate)
        current = {n: rounded(S[n], b[n], sigmoid_bias) for n in names}
        scores = score(current)
        grafted = sum(int(m.sum()) for m in current.values())
        history.append({"step": step, "grafted": float(grafted),
                        **{f"score_{i}": s for i, s in enumerate(scores)}})
        if not quiet:
            shown = " + ".join(f"{s:.4f}" for s in scores)
            print(f"[graft] step {step}/{steps}: {grafted:,} grafted, score {shown}", flush=True)
        # Strictly better only: on a tie the earlier (usually sparser) mask stays.
        if sign * sum(scores) > best[0]:
            best = (sign * sum(scores), step, current)
    _, best_step, best_mask = best
    full = {
        n: (best_mask[n] if n in best_mask else torch.zeros(pre[n].shape, dtype=torch.bool))
        for n in floating
    }
    grafted = sum(int(m.sum()) for m in full.values())
    return GraftResult(
        mask=full,
        region=names,
        grafted=grafted,
        region_size=sum(delta[n].numel() for n in names),
        best_step=best_step,
        best_score=sign * best[0],
        lr=float(rate) if rate is not None else math.nan,
        history=history,
        seconds=time.perf_counter() - started,
    )
