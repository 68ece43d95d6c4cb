"""The fine-tuning loop: ``finetune(base_dir, out_dir, data, task, **options)``."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from weightsmith.errors import OutputError, WeightsmithError
from weightsmith.finetune.data import Dataset, check_label_range, check_task, load_jsonl
from weightsmith.finetune.encoding import Features, collate, encode, pad_id
from weightsmith.finetune.losses import (
    batch_loss,
    classification_loss,
    mixup_logits,
)
from weightsmith.finetune.modeling import (
    check_model_dir,
    iter_safetensors,
    load_model,
    load_weights,
    save_model,
)
from weightsmith.finetune.options import FinetuneOptions, OptionError
from weightsmith.finetune.runtime import fixed_threads
from weightsmith.finetune.schedule import warmup_cosine
from weightsmith.finetune.selection import SparseMask, select_trainable
from weightsmith.finetune.trainlog import TrainLog, package_versions, plot_loss
from weightsmith.io.output_dir import OutputDir
from weightsmith.progress import progress


class TrainingError(WeightsmithError):
    """Training itself failed (the loss became NaN or infinite)."""

    exit_code = 8


@dataclass(frozen=True)
class FinetuneResult:
    out_dir: Path
    steps: int
    final_loss: float
    wall_time_s: float
    trainable_params: int


def check_out_dir(out_dir: Path, base_dir: Path, overwrite: bool) -> None:
    """The fine-tune's OUT may be new or an empty folder; a full one needs ``overwrite``. Also
    called by commands that fine-tune after other work, to refuse before that work."""
    if out_dir.resolve() == base_dir.resolve():
        raise OutputError(f"{out_dir}: output folder is the base model folder; choose another")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError(f"{out_dir}: exists and is not empty; pass --overwrite to replace it")


def _micro_batches(
    features: Sequence[Features], batch_size: int, gen: torch.Generator
) -> Iterator[list[Features]]:
    """Endless stream of shuffled micro-batches, reshuffled every epoch from one generator."""
    n = len(features)
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, batch_size):
            yield [features[j] for j in order[i : i + batch_size]]


def _load_init(model: torch.nn.Module, init_from: str) -> dict[str, object]:
    init_dir = Path(init_from)
    if not init_dir.is_dir():
        raise OptionError(f"--init-from {init_dir}: folder not found")
    loaded = load_weights(model, iter_safetensors(init_dir), source=str(init_dir))
    missing = sorted(set(model.state_dict()) - loaded)
    if missing:
        # Normal for a merged backbone without a task head; worth a word otherwise.
        warnings.warn(
            f"--init-from {init_dir}: {len(missing)} tensors not provided, kept from the base "
            f"(e.g. {', '.join(missing[:3])})",
            stacklevel=3,
        )
    return {"loaded": len(loaded), "kept_from_base": missing}


def finetune(
    base_dir: str | Path,
    out_dir: str | Path,
    data: str | Path | Dataset,
    task: str,
    **options: object,
) -> FinetuneResult:
    """Fine-tune a transformers checkpoint folder and write an HF-format folder to ``out_dir``.

    ``options`` are the fields of :class:`FinetuneOptions` (epochs/steps, lr, warmup_steps,
    batch_size, grad_accum, weight_decay, max_grad_norm, seed, max_length, truncate,
    label_smoothing, mixup, freeze, train_only, mask, half_freeze, init_from, num_labels,
    threads, quiet, overwrite).
    The same seed on the same machine gives bitwise-identical weights.
    """
    check_task(task)
    opts = FinetuneOptions.from_kwargs(**options).validate(task)
    base_dir = check_model_dir(base_dir, "base model")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, base_dir, opts.overwrite)
    dataset = data if isinstance(data, Dataset) else load_jsonl(data, task)

    num_labels = None
    if task == "classification":
        num_labels = opts.num_labels or dataset.num_labels
        check_label_range(dataset, num_labels)
    loaded = load_model(base_dir, task, num_labels=num_labels, seed=opts.seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    if task == "classification":
        check_label_range(dataset, model.config.num_labels)
    init_info = _load_init(model, opts.init_from) if opts.init_from else None

    trainable = select_trainable(model, opts.freeze, opts.train_only, opts.half_freeze, opts.seed)
    mask = SparseMask(model, opts.mask) if opts.mask else None
    if mask is not None:
        trainable &= mask.trainable
    if not trainable:
        raise OptionError("no parameter is left trainable by --freeze/--train-only/--mask")
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)

    features = encode(dataset, tokenizer, opts.max_length, opts.truncate)
    micro_per_epoch = math.ceil(len(features) / opts.batch_size)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / opts.grad_accum))
    total = opts.steps or max(1, math.ceil(opts.epochs * steps_per_epoch))

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    meta: dict[str, object] = {
        "task": task,
        "base": str(base_dir),
        "data": str(dataset.path),
        "num_examples": len(features),
        "num_labels": getattr(model.config, "num_labels", None) if task == "classification" else None,
        "new_head": loaded.new_head,
        "init_from": init_info,
        "options": opts.as_dict(),
        "total_steps": total,
        "steps_per_epoch": steps_per_epoch,
        "trainable_params": sum(p.numel() for _, p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "versions": package_versions(),
    }
    log = TrainLog(meta)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), fixed_threads(opts.threads):
        # One seed drives dropout, shuffling and MixUp so a run is a pure function of it.
        torch.manual_seed(opts.seed)
        shuffle = torch.Generator().manual_seed(opts.seed)
        mix_rng = np.random.default_rng(opts.seed)
        _train(
            model,
            task,
            features,
            opts,
            params,
            mask,
            total,
            shuffle,
            mix_rng,
            pad_id(tokenizer),
            log,
            start,
        )
    wall = time.perf_counter() - start
    model.eval()
    # OUT appears whole or not at all: assembled in a hidden sibling, renamed in when complete,
    # removed on an error or Ctrl-C (a half-saved folder would look like a finished model).
    empty = out_dir.is_dir() and not any(out_dir.iterdir())
    try:
        with OutputDir(out_dir, overwrite=opts.overwrite or empty) as folder:
            save_model(model, tokenizer, base_dir, folder.tmp)
            log.write(folder.tmp, wall)
            plot_loss(log, folder.tmp)
            folder.commit()
    except OSError as e:  # disk full, permissions: one line naming OUT, not a traceback
        raise OutputError(
            f"{out_dir}: cannot write the fine-tuned model ({e.strerror or e}); nothing was left behind"
        ) from e
    return FinetuneResult(
        out_dir=out_dir,
        steps=total,
        final_loss=float(log.steps[-1]["loss"]),
        wall_time_s=wall,
        trainable_params=int(meta["trainable_params"]),  # type: ignore[arg-type]
    )


def _train(
    model: torch.nn.Module,
    task: str,
    features: Sequence[Features],
    opts: FinetuneOptions,
    params: list[tuple[str, torch.nn.Parameter]],
    mask: SparseMask | None,
    total: int,
    shuffle: torch.Generator,
    mix_rng: np.random.Generator,
    pad: int,
    log: TrainLog,
    start: float,
) -> None:
    decay = [p for _, p in params if p.dim() >= 2]  # no decay on biases and norm gains
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opts.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(opts.warmup_steps, total))
    stream = _micro_batches(features, opts.batch_size, shuffle)
    model.train()
    bar = progress(total, "finetune", "step", enabled=not opts.quiet, leave=False)
    try:
        for step in range(1, total + 1):
            step_loss = 0.0
            for _ in range(opts.grad_accum):
                batch = collate(next(stream), pad)
                if opts.mixup > 0:
                    lam = float(mix_rng.beta(opts.mixup, opts.mixup))
                    perm = torch.randperm(len(batch["labels"]), generator=shuffle)
                    logits = mixup_logits(model, batch, lam, perm)
                    loss = classification_loss(logits, batch["labels"], opts.label_smoothing, lam, perm)
                else:
                    loss = batch_loss(model, task, batch, opts.label_smoothing)
                (loss / opts.grad_accum).backward()
                step_loss += loss.item() / opts.grad_accum
            if not math.isfinite(step_loss):
                raise TrainingError(f"training diverged: loss is {step_loss} at step {step}; lower --lr")
            if mask is not None:
                mask.mask_grads()  # before clipping, so masked entries do not count in the norm
            if opts.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], opts.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if mask is not None:
                mask.restore()
            log.record(step, step_loss, lr, time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
    finally:
        bar.close()
